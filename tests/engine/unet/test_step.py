"""The UNet step's x0 prediction (previews): the scheduler's own math for epsilon and v prediction, kept from
the last step's model output, and close to the result at the end of an edit."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from instgenie.engine.request import EditRequest
from instgenie.engine.unet.step import predicted_x0
from tests.engine.helpers import masks_for, random_image

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_is_ddims_pred_original_sample(prediction_type):
    sched = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type=prediction_type)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample, output = torch.randn(1, 4, 8, 12, generator=g), torch.randn(1, 4, 8, 12, generator=g)
    for t in sched.timesteps[[0, 4, 9]]:
        want = sched.step(output, t, sample).pred_original_sample
        assert torch.allclose(predicted_x0(sched, t, sample, output), want, atol=1e-5)


def test_predicted_x0_matches_ddpm_and_refuses_sigma_space_schedulers():
    ddpm = DDPMScheduler(**SD, clip_sample=False)
    ddpm.set_timesteps(20)
    sample, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = ddpm.timesteps[3]
    assert torch.allclose(predicted_x0(ddpm, t, sample, output),
                          ddpm.step(output, t, sample).pred_original_sample, atol=1e-5)
    euler = EulerDiscreteScheduler(**SD)
    euler.set_timesteps(20)
    with pytest.raises(ValueError, match="variance-preserving"):
        predicted_x0(euler, euler.timesteps[3], sample, output)


def test_the_preview_latents_at_the_last_step_are_close_to_the_result(unet_editor):
    res = unet_editor.model.info.resolution
    manifest = unet_editor.register_template(random_image(res, 3), "a cat", seed=1)
    state = unet_editor.start(EditRequest(manifest.template_id, masks_for(res)["disc"], "a dog", seed=2))
    assert state.last_prediction is None  # no step yet: nothing to preview
    while state.step_index < state.total_steps - 1:
        unet_editor.step([state])
    i, sample, output = state.last_prediction
    assert i == state.total_steps - 2 and sample.shape == output.shape == state.latents.shape
    preview = unet_editor.preview_latents(state, unet_editor.preview_inputs(state, None))
    unet_editor.step([state])
    final = state.latents
    blend = state.mask.blend
    # outside the mask: the template's latents, as the result
    outside = (blend == 0).expand_as(final)
    assert torch.equal(preview[outside], final[outside])
    inside = ~outside
    err = (preview - final)[inside].abs().mean() / final[inside].abs().mean()
    assert err < 0.1, f"the last preview is {err:.1%} off the result's masked latents"
