# `make test`: create .venv if missing, install lcm-jax with the test extra, run the suite.
# `make test-fast`: the same without the end-to-end tests marked slow (a few minutes).
# `make demo`: the quick-start job (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORE_STAMP := $(VENV)/.installed-core

.PHONY: test test-fast demo toy-table install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The test extra (torch, diffusers: the reference implementations) is only for `make test`.
# Reference implementations the metric tests run in a subprocess and that must not be importable
# beside lcm-jax (torchvision's CUDA wheel breaks transformers' image processors next to the CPU
# torch): pytorch-fid, clean-fid and torchvision, kept in their own folder.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --upgrade --no-deps --target $(VENV)/reference-packages \
	  torchvision==0.28.0 pytorch-fid==0.3.0 clean-fid==0.1.35
	touch $(STAMP) $(CORE_STAMP)

$(CORE_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $(CORE_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q --durations=10 -m "not slow" tests

demo: $(CORE_STAMP)
	$(PY) -m lcm_jax.toy.demo

# The README's toy Table 1 and LCF numbers, from the LCM that `make demo` distils (about 25
# minutes on 2 CPU cores after the demo): score it against the teacher's samplers, then
# fine-tune it with LCF on the colours the teacher never saw and score it there before/after.
# The generated images are cached under workdirs/toy_eval (a rerun skips finished cells), not docs/.
toy-table: demo
	$(PY) -m lcm_jax.toy.evaluate --lcm workdirs/toy --output docs/toy/table1 --cache_dir workdirs/toy_eval/table1
	$(PY) -m lcm_jax.toy.domain --output workdirs/toy_data/shifted --num_images 4000 --colours shifted --seed 5
	$(PY) -m lcm_jax.toy.evaluate --lcm workdirs/toy --output docs/toy/lcf_before --domain shifted --samplers lcm --steps 1,2,4,8 --reference_steps 0 --cache_dir workdirs/toy_eval/lcf_before
	$(PY) -m lcm_jax.train --config=configs/toy.py:lcf --workdir=workdirs/toy_lcf
	$(PY) -m lcm_jax.toy.evaluate --lcm workdirs/toy_lcf --output docs/toy/lcf_after --domain shifted --samplers lcm --steps 1,2,4,8 --reference_steps 0 --cache_dir workdirs/toy_eval/lcf_after

clean:
	rm -rf $(VENV) build *.egg-info
