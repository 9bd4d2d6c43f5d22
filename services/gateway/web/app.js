// The page: connect with an API key, show the tenant's templates, register new ones with live progress, paint
// a mask, run the edit with per-step progress and previews, and show the result with a compare slider.
import { apiKey, getBlob, getJSON, postForm, streamEvents } from './api.js';
import { MaskEditor } from './mask.js';

const $ = (id) => document.getElementById(id);
const state = { templates: [], selected: null, templateURL: '', running: false };
const editor = new MaskEditor($('template-canvas'), $('mask-canvas'), (ed) => {
  $('undo').disabled = ed.history.length === 0;
  $('mask-info').textContent = `${ed.painted} of ${ed.width * ed.height} pixels masked`;
  $('mask-canvas').dataset.painted = String(ed.painted);
});

function status(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

function logEvent(type, text) {
  const li = document.createElement('li');
  li.dataset.type = type;
  li.textContent = text ? `${type} ${text}` : type;
  $('events').append(li);
  $('events').scrollTop = $('events').scrollHeight;
}

// ------------------------------------------------------------------------------------------- gallery
async function loadGallery() {
  const list = await getJSON('/v1/templates?page_size=100');
  state.templates = list.data;
  const gallery = $('gallery');
  gallery.replaceChildren();
  for (const t of list.data) {
    const item = document.createElement('button');
    item.type = 'button';
    item.className = 'template';
    item.setAttribute('role', 'listitem');
    item.dataset.id = t.id;
    item.dataset.state = t.state;
    item.title = `${t.id}\n${t.width}x${t.height}, ${t.steps} steps, prompt ${JSON.stringify(t.prompt)}`;
    const img = document.createElement('img');
    img.alt = t.name || t.id;
    const caption = document.createElement('span');
    caption.textContent = t.name || t.id.slice(0, 12);
    const st = document.createElement('span');
    st.className = 'state';
    st.textContent = t.state;
    item.append(img, caption, st);
    item.disabled = t.state !== 'ready';
    item.addEventListener('click', () => select(t));
    gallery.append(item);
    getBlob(t.image_url).then((b) => { img.src = URL.createObjectURL(b); }).catch(() => { img.alt = 'no image'; });
  }
  status(list.data.length ? `${list.data.length} templates. Pick one to edit.` : 'No templates yet: register one.');
}

async function select(t) {
  state.selected = t;
  for (const el of document.querySelectorAll('.template')) {
    el.setAttribute('aria-selected', String(el.dataset.id === t.id));
  }
  const blob = await getBlob(t.image_url);
  if (state.templateURL) URL.revokeObjectURL(state.templateURL);
  state.templateURL = URL.createObjectURL(blob);
  const img = new Image();
  img.src = state.templateURL;
  await img.decode();
  editor.load(img);
  $('brush-size').max = String(Math.max(2, Math.round(Math.max(t.width, t.height) / 2)));
  $('steps').placeholder = String(t.steps);
  $('editor').hidden = false;
  $('editor').dataset.template = t.id;
  status(`Template ${t.name || t.id} (${t.width}x${t.height}, ${t.steps} steps): paint the region to edit.`);
}

// -------------------------------------------------------------------------------------- registration
async function register(event) {
  event.preventDefault();
  const file = $('upload-image').files[0];
  if (!file) return;
  const form = new FormData();
  form.append('image', file);
  form.append('prompt', $('upload-prompt').value);
  form.append('name', $('upload-name').value || file.name);
  const bar = $('upload-progress');
  bar.hidden = false;
  bar.value = 0;
  try {
    const op = await postForm('/v1/templates', form);
    $('upload-status').textContent = `registering ${op.template_id} ...`;
    let last = op;
    await streamEvents(`/v1/templates/${op.template_id}/events`, {}, (type, data) => {
      if (type === 'error') throw new Error(data.error.message);
      last = data;
      bar.max = data.total_steps || 1;
      bar.value = data.steps_done;
      $('upload-status').textContent = `${data.state}: step ${data.steps_done}/${data.total_steps}`;
    });
    if (last.error) throw new Error(last.error);
    await loadGallery();
    const t = state.templates.find((x) => x.id === op.template_id);
    if (t) await select(t);
  } catch (err) {
    $('upload-status').textContent = '';
    status(`Registration failed: ${err.message}`, true);
  }
}

// -------------------------------------------------------------------------------------------- editing
async function runEdit(event) {
  event.preventDefault();
  const t = state.selected;
  if (!t || state.running) return;
  if (!editor.painted) {
    status('Paint the region to edit first.', true);
    return;
  }
  const form = new FormData();
  form.append('template_id', t.id);
  form.append('mask', await editor.toOpenAIMask(), 'mask.png');
  form.append('prompt', $('prompt').value);
  form.append('stream', 'true');
  form.append('partial_images', $('previews').value || '0');
  if ($('seed').value !== '') form.append('seed', $('seed').value);
  if ($('steps').value !== '') form.append('steps', $('steps').value);
  state.running = true;
  $('submit').disabled = true;
  $('events').replaceChildren();
  $('preview').removeAttribute('src');
  $('progress').value = 0;
  $('progress').dataset.step = '0';
  status('Editing ...');
  try {
    let done = false;
    await streamEvents('/v1/images/edits', { method: 'POST', body: form }, (type, data) => {
      if (type === 'instgenie.progress') {
        $('progress').max = data.total_steps;
        $('progress').value = data.step;
        $('progress').dataset.step = String(data.step);
        $('progress-text').textContent = `step ${data.step}/${data.total_steps}`;
        logEvent(type, `${data.step}/${data.total_steps} (batch ${data.batch_size})`);
      } else if (type === 'image_edit.partial_image') {
        $('preview').src = `data:image/png;base64,${data.b64_json}`;
        $('preview').dataset.count = String(data.partial_image_index + 1);
        logEvent(type, `#${data.partial_image_index} at step ${data.step}`);
      } else if (type === 'image_edit.completed') {
        done = true;
        logEvent(type);
        showResult(t, data);
      } else if (type === 'error') {
        throw new Error(data.error.message);
      } else {
        logEvent(type, type === 'instgenie.started' ? `on ${data.worker}, cache ${data.cache_tier}` : '');
      }
    });
    if (!done) throw new Error('the stream ended without a result');
  } catch (err) {
    status(`Edit failed: ${err.message}`, true);
  } finally {
    state.running = false;
    $('submit').disabled = false;
  }
}

function showResult(t, data) {
  const src = `data:image/png;base64,${data.b64_json}`;
  const info = data.instgenie.results[0];
  $('result-template').src = state.templateURL;
  $('compare-before').src = state.templateURL;
  $('result-image').src = src;
  $('compare-after').src = src;
  $('download').href = src;
  $('download').download = `${t.id}-seed${info.seed}.png`;
  $('result-caption').textContent = `edit · seed ${info.seed} · ${(info.mask_ratio * 100).toFixed(0)}% computed`
    + ` · ${info.total_seconds.toFixed(2)} s`;
  $('result').hidden = false;
  $('result').dataset.ready = 'true';
  status(`Done in ${info.total_seconds.toFixed(2)} s on ${info.worker}, `
    + `from the cache of template ${data.instgenie.template_id}.`);
}

// ------------------------------------------------------------------------------------------- controls
function setTool(erasing) {
  editor.erasing = erasing;
  $('tool-brush').setAttribute('aria-pressed', String(!erasing));
  $('tool-eraser').setAttribute('aria-pressed', String(erasing));
}

$('tool-brush').addEventListener('click', () => setTool(false));
$('tool-eraser').addEventListener('click', () => setTool(true));
$('brush-size').addEventListener('input', () => {
  editor.size = Number($('brush-size').value);
  $('brush-size-value').textContent = $('brush-size').value;
});
$('undo').addEventListener('click', () => editor.undo());
$('clear').addEventListener('click', () => editor.clear());
$('compare-slider').addEventListener('input', () => {
  $('compare-after').style.clipPath = `inset(0 0 0 ${$('compare-slider').value}%)`;
});
$('upload-form').addEventListener('submit', register);
$('edit-form').addEventListener('submit', runEdit);
$('key-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  apiKey.set($('api-key').value.trim());
  try {
    await loadGallery();
  } catch (err) {
    status(err.status === 401 ? `Key refused: ${err.message}` : `Cannot list templates: ${err.message}`, true);
  }
});

editor.size = Number($('brush-size').value);
if (apiKey.get()) {
  $('api-key').value = apiKey.get();
  loadGallery().catch((err) => status(err.message, true));
}
