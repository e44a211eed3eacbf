# Set-up and the two everyday commands. Needs only python3 (>= 3.10) on the machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 install from this machine's local wheels; an unpinned
# torch may pull several GB of CUDA wheels. On a GPU machine see README "Install for a GPU".
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pathrobust demo

test: install
	HF_HUB_OFFLINE=1 PATHROBUST_NO_PROGRESS=1 $(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info
