# Two commands set medseg up on a fresh machine:
#   make demo   create .venv, install, train the demo U-Net (SQLite MLflow store in runs/)
#   make test   install the dev extras and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: browser spark fuzz serve-attacks demo test bench bench-precision bench-predict bench-ddp bench-classification bench-recon bench-memory bench-cost-model bench-detection bench-lineage bench-translation recon medmnist install install-dev ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1"

# torch is a range whose newest member is the CPU build this machine serves, so a CPU-only
# install never pulls the multi-GB CUDA wheels; on a GPU machine install your CUDA torch first.
# --no-compile: byte-compiling every module of every package (torch's, ray's, openvino's thousands) is
# two thirds of an install's time here; Python compiles the modules a command imports when it imports them.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/medseg run configs/demo_segmentation.yaml
	@echo "Open the MLflow UI on this store:  make ui   (= $(BIN)/mlflow ui --backend-store-uri sqlite:///runs/mlflow.db, then http://127.0.0.1:5000)"

test: $(VENV)/.installed-dev browser
	$(BIN)/python -m pytest

# The review page (review.html) is tested in a real headless Chromium from the OS packages,
# driven by Playwright; installed here when missing on Debian/Ubuntu (apt-get, as root or via
# sudo). Elsewhere install Chromium yourself: the browser tests fail saying so (or set
# MEDSEG_SKIP_BROWSER_TESTS=1 to skip them).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; \
	  else echo "make browser: no apt-get here; install Chromium for the review-page browser tests"; fi; }

# The Spark recipe's slow test (docs/how-to/cluster.md, tests/serving/test_spark_udf.py): pyspark (the spark extra)
# and Java 17+ installed when missing -- Java with apt-get on Debian/Ubuntu, as `browser` installs Chromium.
spark: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet --no-compile -e ".[spark]"
	@command -v java >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q openjdk-17-jre-headless >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q openjdk-17-jre-headless >/dev/null; }; \
	  else echo "make spark: no apt-get here; install Java 17+ for Spark"; fi; }
	$(BIN)/python -m pytest -m slow -n 0 -q tests/serving/test_spark_udf.py

# The fuzz suite, fast and slow parts (thousands of generated hostile files): about 4 minutes
# -> benchmarks/results/fuzz.{json,md} (inputs tried per class, escapes)
fuzz: $(VENV)/.installed-dev
	MEDSEG_FUZZ_REPORT=benchmarks/results/fuzz.json $(BIN)/python -m pytest tests/fuzz -m "slow or not slow" -q

# The hostile-client suite against a real `medseg serve` process (about 2 minutes)
# -> benchmarks/results/serve.json's "attacks" section (bench_serve.py writes the rest and keeps it)
serve-attacks: $(VENV)/.installed-dev
	MEDSEG_SERVE_REPORT=benchmarks/results/serve.json $(BIN)/python -m pytest tests/serving/test_hostile.py -q

# BENCH_ARGS is added to every bench target's command. BENCH_ARGS=--tiny runs each one's code paths on toy
# inputs in seconds to a minute, into a new temporary folder (never benchmarks/results), as the test suite does
# (tests/test_benchmarks.py): `make bench bench-predict BENCH_ARGS=--tiny`; add `--out DIR` to choose the folder.
BENCH_ARGS ?=

# W1-W4 against plain MONAI tutorial pipelines, interleaved in one run: about 10 minutes on 2 cores
bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_perf.py --repeats 3 $(BENCH_ARGS)

# fp32 / channels-last / bf16 Dice on the hippocampus validation set, after a 6-minute training run
bench-precision: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/check_precision.py --minutes 6 $(BENCH_ARGS)

# medseg predict on each backend (torch, onnxruntime, openvino) against the tutorial inference loop
# (hippocampus folder and a 512x512x300 CT); BENCH_PREDICT_ARGS="--hippocampus-model DIR" for a trained model
bench-predict: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_predict.py $(BENCH_PREDICT_ARGS) $(BENCH_ARGS)

# Where folder inference spends its time, stage by stage (read, preprocess, network, sliding window, invert,
# write, the rest): medseg predict against the tutorial loop on the 52 held-out hippocampus scans at 1 and 2
# threads, after a 4-minute training run -> predict_stages.md (--hippocampus-model URI --tracking-uri DB reuses a
# model, --label names the run; not a bench target: the W4 figures of `make bench` are what it explains)
profile-predict: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/profile_predict.py --train-minutes 4 $(BENCH_ARGS)

# 1 process against 2 (torchrun, gloo on CPUs) on the demo config: about 8 minutes on 2 cores
bench-ddp: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_ddp.py --repeats 3 $(BENCH_ARGS)

# medseg's cached, in-process data path against a plain MONAI Dataset + 2 workers, PneumoniaMNIST training
bench-classification: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_classification.py --repeats 3 --epochs 2 $(BENCH_ARGS)

# medseg's cached reconstruction data path against a plain MONAI pipeline, recon_mri_4x training
bench-recon: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_recon.py --repeats 3 --epochs 2 $(BENCH_ARGS)

# Through-plane super-resolution on the held-out hippocampus cases (configs/sr_hippocampus_3x.yaml, 5 minutes of SR
# training per factor), judged by a frozen segmenter trained here for 15 minutes (or BENCH_ARGS="--segmenter URI
# --tracking-uri URI"): Dice, PSNR/SSIM and CPU seconds of SR, trilinear and B-spline -> super_resolution.md
.PHONY: bench-sr
bench-sr: $(VENV)/.installed-dev
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_sr.py --factors 3 --sr-minutes 5 --segmenter-minutes 15 $(BENCH_ARGS)

# Accelerated MRI (configs/recon_mri_4x.yaml at 4x and 8x, 4 minutes of training each) judged by a frozen hippocampus
# segmenter trained here for 15 minutes (or BENCH_ARGS="--segmenter URI --tracking-uri URI"): Dice of fully sampled,
# zero-filled and reconstructed test volumes, beside PSNR/SSIM -> recon_downstream.md
.PHONY: bench-recon-downstream
bench-recon-downstream: $(VENV)/.installed-dev
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_recon_downstream.py --accelerations 4,8 --minutes 4 $(BENCH_ARGS)

# Lesion detection on the synthetic CT lesion set (configs/detection_synthetic_ct.yaml): RetinaNet against a U-Net's
# connected components, 10 minutes of training each, one torch thread, one arm per invocation (about 30 minutes on
# 2 cores) -> detection.md (FROC at 1/2/4 FP per scan, mAP at IoU 0.1 and 0.5 on the 8 held-out scans)
bench-detection: $(VENV)/.installed-dev
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_detection.py --minutes 10 --arms retinanet $(BENCH_ARGS)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_detection.py --minutes 10 --arms segment_components $(BENCH_ARGS)

# The CNN lineage (perceptron ... DenseNet-121) at one training budget per dataset on PneumoniaMNIST, BreastMNIST
# and AdrenalMNIST3D, 3 seeds -> lineage.md: 72 runs, each its budget of training plus verify and test scoring
# (1.2 to 5 times the budget a run on a loaded 2-core host, the large networks' first step and test scoring the
# most: about 80 minutes in all; --datasets/--networks/--seeds run a part, and entries are merged)
bench-lineage: medmnist $(VENV)/.installed-dev
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_lineage.py --budget-s 30 --seeds 0,1,2 --datasets breast $(BENCH_ARGS)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_lineage.py --budget-s 40 --seeds 0,1,2 --datasets pneumonia $(BENCH_ARGS)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_lineage.py --budget-s 40 --seeds 0,1,2 --datasets adrenal3d $(BENCH_ARGS)

# Image-to-image translation (recon.problem: translation): PGBM-001's FLAIR from its other contrasts on held-out
# slabs and a known-answer hippocampus phantom, 6 minutes of training each, one torch thread (about 15 minutes on 2
# cores) -> translation.md (PSNR/SSIM/MAE of the network vs histogram matching, the trusted mask's share)
bench-translation: $(VENV)/.installed-dev
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_translation.py --minutes 6 $(BENCH_ARGS)

# Peak memory of predicting a 512x512x300 CT, 3 classes: the full buffer before bounded prediction (9b682be), the
# full buffer now and slab by slab, interleaved: about 10 minutes on 2 cores -> memory.md (the 512x512x1000
# whole-body volume, slab by slab only: `$(BIN)/python benchmarks/bench_memory.py --skip-ct`)
bench-memory: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_memory.py --repeats 2 --skip-wb $(BENCH_ARGS)

# The cost of a 100,000-CT cohort on a cluster (--cohort, --machines, --cores, --memory-gb...), fitted to ray.json,
# predict.json and memory.json (measures nothing itself: seconds) -> cost_model.md
bench-cost-model: $(VENV)/.installed
	$(BIN)/python benchmarks/cost_model.py $(BENCH_ARGS)

# The three reconstruction configs, about 11 minutes each on 2 cores
recon: $(VENV)/.installed
	$(BIN)/medseg run configs/recon_mri_4x.yaml
	$(BIN)/medseg run configs/recon_ct_sparse.yaml
	$(BIN)/medseg run configs/denoise_mri.yaml

# Import the MedMNIST files from ../shared/data (images under data/, manifests as committed)
MEDMNIST ?= ../shared/data/medmnist
medmnist: $(VENV)/.installed
	$(BIN)/medseg manifest build --from-medmnist $(MEDMNIST)/pneumoniamnist.npz --out data_manifests/medmnist_pneumonia.csv --data-dir data/pneumoniamnist
	$(BIN)/medseg manifest build --from-medmnist $(MEDMNIST)/breastmnist.npz --out data_manifests/medmnist_breast.csv --data-dir data/breastmnist
	$(BIN)/medseg manifest build --from-medmnist $(MEDMNIST)/adrenalmnist3d.npz --out data_manifests/medmnist_adrenal3d.csv --data-dir data/adrenalmnist3d

# The results tables (docs/results, benchmarks/results): each target trains the configs behind one table with `medseg run` (runs
# in runs/, tracked in runs/mlflow.db) and writes benchmarks/results/<name>.json and .md, with held-out
# test metrics, epochs, minutes, the commit and the machine. Times are for this project's 2-core CPU.
.PHONY: results results-hippocampus results-medmnist results-recon results-demo results-calibration results-uncertainty results-plan results-numbered
# medseg plan on every dataset, each planned config run unedited -> plan.md (about 3 hours on 2 cores; needs
# highdicom, the dev extras have it)
results-plan: medmnist $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_plan.py fingerprint
	$(BIN)/python benchmarks/bench_plan.py hippocampus --budget 30
	$(BIN)/python benchmarks/bench_plan.py hippocampus --budget 15
	$(BIN)/python benchmarks/bench_plan.py tumour --budget 20
	$(BIN)/python benchmarks/bench_plan.py medmnist --budget 5 --seeds 3
	$(BIN)/python benchmarks/bench_plan.py synthetic-ct --budget 10
	$(BIN)/python benchmarks/bench_plan.py png --budget 4
	$(BIN)/python benchmarks/bench_plan.py pyradiomics
# temperature scaling on PneumoniaMNIST and BreastMNIST (3 seeds each; about 50 minutes on 2 cores),
# HIPPOCAMPUS_RUN=runs/msd_hippocampus/<stamp> also calibrates that finished run -> calibration.md
results-calibration: medmnist
	$(BIN)/python benchmarks/eval_calibration.py $(if $(HIPPOCAMPUS_RUN),--hippocampus-run $(HIPPOCAMPUS_RUN))
# per-case uncertainty and QC flags against Dice on the hippocampus test split, MODEL=<model folder or URI>
# (trained with a left-right flip, e.g. --set 'augment=[{name: flip, axes: [0], prob: 0.5}, ...]') -> uncertainty.md
results-uncertainty: $(VENV)/.installed
	$(BIN)/python benchmarks/eval_uncertainty.py --model $(MODEL)
# msd_hippocampus.yaml for 30 min, 6 min, and 30 min with 2 processes: about 70 minutes -> hippocampus.md
results-hippocampus: $(VENV)/.installed
	$(BIN)/python benchmarks/run_results.py hippocampus

# the three MedMNIST configs (and AdrenalMNIST3D at lr 0.002), 3 seeds each: about 50 minutes -> medmnist.md
results-medmnist: medmnist
	$(BIN)/python benchmarks/run_results.py medmnist

# recon_mri_4x (5 model/acceleration variants), recon_ct_sparse, denoise_mri, about 11 minutes each:
# about 80 minutes -> reconstruction.md
results-recon: $(VENV)/.installed
	$(BIN)/python benchmarks/run_results.py recon

# issue #32: the 624 PneumoniaMNIST test images as test_0000..test_0623.nii.gz predicted as 624 cases (AUC
# against the run's own test AUC), and a 2-channel nnU-Net folder still one case per 2 files: about 4 minutes
# (MODEL=<a finished medmnist_pneumonia run folder> skips the training) -> numbered_files.md
results-numbered: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_numbered_files.py --npz $(MEDMNIST)/pneumoniamnist.npz $(if $(MODEL),--model $(MODEL))

# the demo config: about 2 minutes -> demo.md
results-demo: $(VENV)/.installed
	$(BIN)/python benchmarks/run_results.py demo

# all four, one after another: about 3.4 hours
results: results-demo results-hippocampus results-medmnist results-recon

# The documentation site (mkdocs.yml): reference pages generated from the code, results pages included
# from benchmarks/results/; --strict fails on a broken link, a page missing from the nav or an unshown results
# file. Writes site/; `$(BIN)/mkdocs serve` previews it at http://127.0.0.1:8000
.PHONY: docs
docs: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

ui: $(VENV)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///runs/mlflow.db

clean:
	rm -rf runs $(VENV) *.egg-info
