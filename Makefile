# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and
# installs what it needs on first use; later runs skip the install (stamp file).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pinned: the build machines carry exactly these wheels; other versions download gigabytes.
TORCH := torch==2.14.1 torchvision==0.29.1
MODEL ?= vit_tiny
, := ,
WEIGHTS ?=

.PHONY: demo demo-video test bench study install clean gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m featcache_cli.demo --model $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS))

# Video: which way does an object move? Only LoSA's temporal mixing can tell.
demo-video: $(STAMP)
	$(PY) -m featcache_cli.demo_video --model $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS))

test: $(STAMP)
	$(PY) -m pytest -q

# Measurements (never part of the tests): tables on stdout, JSON and PNG in benchmarks/results/.
# `make bench QUICK=1`: the same figures from smaller inputs (under 10 minutes on 2 CPU cores;
# 5 min 8 s here, with training_cost's compiled row), written to benchmarks/results/quick/ (not committed).
QUICK ?=
bench: $(STAMP)
	cd benchmarks && $(if $(QUICK),export BENCH_RESULTS=results/quick &&) ../$(PY) extract_throughput.py $(if $(QUICK),--n 96 --dtypes fp16$(,)int8,--n 256) \
	  && ../$(PY) loader_throughput.py $(if $(QUICK),--samples 400 --buffer-mb 64) \
	  && ../$(PY) training_cost.py $(if $(QUICK),--n 64) \
	  $(if $(QUICK),,&& ../$(PY) training_cost.py --model vit_base) \
	  && ../$(PY) sweep_cost.py $(if $(QUICK),--epochs 1) \
	  && ../$(PY) int8_error.py $(if $(QUICK),--n 64 --img-size 112) \
	  && ../$(PY) listing_cost.py $(if $(QUICK),--samples 200000)

# The real-feature LoSA study: every row at 112 px; at 224 px the probes, the default LoSA,
# its ranks and its ablations (hours on a CPU; resumes where it stopped).
study: $(STAMP)
	cd benchmarks && ../$(PY) losa_study.py && ../$(PY) losa_study.py --img-size 224 --rows core,ranks,ablations

# Wheels for a GPU machine that has torch and timm but no network and no zarr (this
# project's device machines: Python 3.12), and this package's own for its version
# metadata; benchmarks/gpu_check.sh installs them there.
GPU_WHEELS := zarr numcodecs donfig google-crc32c crc32c PyYAML
gpu-wheels: $(STAMP)
	rm -rf .whl && $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -m pip freeze | grep -iE '^($(subst $() ,|,$(GPU_WHEELS)))==')
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl .
	du -sh .whl

clean:
	rm -rf cache runs .pytest_cache data/moving-*
