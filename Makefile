# sparkscore: `make` lists the targets. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Python workers must run the venv's interpreter, or they cannot import torch/pyarrow.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
# Spark binds its driver to this address: loopback only, and no "hostname resolves to loopback" warning.
export SPARK_LOCAL_IP ?= 127.0.0.1
SPARK_SUBMIT := $(VENV)/bin/spark-submit --driver-java-options "-Dlog4j2.configurationFile=file:$(abspath conf/log4j2.properties)"
DEMO := build/demo
# JVM jars, fetched by Maven (its own settings name the repository): Spark's Kafka connector for
# --jars, and the Apache Kafka broker that tests and benchmarks run (kept off Spark's classpath).
JARS       := build/jars/.fetched
KAFKA_JARS := build/kafka/libs/.fetched
MVN        := mvn -q -B -Dstyle.color=never
PORT       ?= 9092

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Spark (the batch and stream jobs, the tests) needs Java; the real-time scorer does not.
need-java:
	@command -v java >/dev/null || { echo "Java 17 is required (apt-get install openjdk-17-jre-headless)"; exit 1; }

setup: $(STAMP) need-java ## create .venv with the pinned dependencies (and redis-server when root)
	@command -v redis-server >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing: sudo apt-get install redis-server"; exit 1; fi; }

$(DEMO)/ctr.pt $(DEMO)/ctr.onnx &: $(STAMP) udfs/demo.py
	$(PY) -m udfs.demo --out $(DEMO)

# The demo model in MLflow's default sqlite store (no tracking server): demo_ctr, alias @champion.
MLFLOW_DEMO := build/mlflow
$(MLFLOW_DEMO)/mlflow.db: $(STAMP) udfs/demo.py udfs/mlflow_demo.py
	$(PY) -m udfs.mlflow_demo --root $(MLFLOW_DEMO)

demo: need-java $(STAMP) $(DEMO)/ctr.pt $(DEMO)/ctr.onnx $(MLFLOW_DEMO)/mlflow.db ## build the demo model (.pt, .pt2, .onnx, and models:/demo_ctr@champion in build/mlflow) and table, then run the batch job on local Spark
	$(SPARK_SUBMIT) --master 'local[*]' jobs/batch_score.py --config conf/batch.toml

demo-mlflow: need-java $(STAMP) $(DEMO)/ctr.pt $(MLFLOW_DEMO)/mlflow.db ## the batch job with the model from the local MLflow registry (models:/demo_ctr@champion)
	$(SPARK_SUBMIT) --master 'local[*]' jobs/batch_score.py --config conf/batch.toml \
	  --model models:/demo_ctr@champion --output build/demo/predictions_mlflow --mode overwrite

$(JARS): jvm/pom.xml
	@command -v mvn >/dev/null || { echo "Maven is required to fetch the JVM jars (apt-get install maven)"; exit 1; }
	rm -rf build/jars
	$(MVN) -f jvm/pom.xml dependency:copy-dependencies -DoutputDirectory=$(abspath build/jars)
	touch $@

$(KAFKA_JARS): jvm/kafka-broker/pom.xml
	@command -v mvn >/dev/null || { echo "Maven is required to fetch the JVM jars (apt-get install maven)"; exit 1; }
	rm -rf build/kafka/libs
	$(MVN) -f jvm/kafka-broker/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(abspath build/kafka/libs)
	touch $@

# Hadoop's local file system with java.nio permissions (no forked chmod per checkpoint file): jvm/localfs.
LOCALFS_JAR := build/localfs/sparkscore-localfs.jar
$(LOCALFS_JAR): $(wildcard jvm/localfs/sparkscore/hadoop/*.java) $(STAMP)
	@command -v javac >/dev/null || { echo "javac (a JDK) is required to build $@ (apt-get install openjdk-17-jdk-headless)"; exit 1; }
	rm -rf build/localfs && mkdir -p build/localfs/classes
	javac --release 17 -d build/localfs/classes -cp "$$($(PY) -c 'import pyspark, os; print(os.path.join(os.path.dirname(pyspark.__file__), "jars", "*"))')" jvm/localfs/sparkscore/hadoop/*.java
	jar cf $@ -C build/localfs/classes .

localfs: $(LOCALFS_JAR) ## build/localfs: local checkpoints without a forked chmod per file (bench/checkpoint_bench.py)

bench-checkpoint: $(LOCALFS_JAR) ## checkpoint cost per micro-batch: Hadoop's chmod vs java.nio (bench/results/checkpoint.json)
	$(PY) bench/checkpoint_bench.py $(ARGS)

jars: $(JARS) $(KAFKA_JARS) ## fetch Spark's Kafka connector (build/jars) and the Apache Kafka broker (build/kafka/libs) with Maven

# The suite is CPU-bound on 2 cores (sampled /proc/stat: idle under 1 % through a run), and each
# worker adds its own Spark session, brokers and contention: three pytest workers, each taking whole
# files so a file's module-scoped fixtures (brokers, Spark tables) are built once. Quiet machine, the
# same tree: 14:32 with three (1,277 CPU-s in tests), 16:18 with four (1,461); six took 17:06.
PYTEST_PARALLEL ?= -n 3 --dist loadfile
test: setup jars ## run every test (Spark, Kafka, Redis, subprocess jobs, local-cluster)
	$(PY) -m pytest tests $(PYTEST_PARALLEL)

test-fast: setup jars ## the quick loop: no slow, kafka or redis tests
	$(PY) -m pytest tests -m "not slow and not kafka and not redis" $(PYTEST_PARALLEL)

lint: $(STAMP) ## ruff check, ruff format --check and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

package: $(STAMP) ## build dist/sparkscore.zip (for --py-files) and a wheel
	rm -rf dist && mkdir -p dist
	$(PY) -m pip wheel --quiet --no-deps -w dist .
	$(PY) -c "import shutil; shutil.copy(next(__import__('glob').iglob('dist/sparkscore-*.whl')), 'dist/sparkscore.zip')"
	@echo "dist/sparkscore.zip: pass it to spark-submit --py-files"

bench-batch: need-java $(STAMP) ## batch benchmark (bench/results/batch.json and .png; ARGS="--rows N ...")
	$(PY) bench/batch_bench.py $(ARGS)

# Delta Lake writes vs Parquet and incremental vs full; merged into batch.json under "delta".
bench-delta: need-java $(STAMP) jars ## Delta append/overwrite/MERGE vs Parquet, incremental vs full (batch.json "delta"; ARGS="--rows N")
	$(PY) bench/delta_bench.py $(ARGS)

clean: ## remove build outputs (keeps .venv)
	rm -rf build dist spark-warehouse metastore_db derby.log

.PHONY: help need-java setup jars demo demo-mlflow test test-fast lint format package bench-batch bench-delta clean

# --- serving ---
serve: $(STAMP) $(DEMO)/ctr.pt ## real-time scorer on 127.0.0.1:8080 (demo model, no Redis; --redis-url via ARGS)
	$(PY) -m serving --config conf/serve.toml $(ARGS)

# Ray Serve and BentoML conflict with the project's pins: they live in their own venv, for the bench only.
PEERS_VENV := build/peers-venv
$(PEERS_VENV)/.installed:
	python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet torch==2.13.0 "ray[serve]==2.60.0" "bentoml==1.4.40" numpy
	touch $@

peers-venv: ## the bench's venv for Ray Serve and BentoML (build/peers-venv; not used by the tests)
	@$(MAKE) --no-print-directory $(PEERS_VENV)/.installed || echo "could not build $(PEERS_VENV): the bench records Ray Serve and BentoML as unavailable"

# A full run takes 10-15 minutes; on a shared machine: flock /tmp/sparkscore-bench.lock make bench-realtime
bench-realtime: $(STAMP) $(DEMO)/ctr.pt peers-venv ## real-time benchmark vs Ray Serve, BentoML, FastAPI (bench/results/realtime.json and .png)
	@# wrk measures the closed-loop figures; without it the bench falls back to its Python client.
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } \
	  || echo "wrk is missing (apt-get install wrk): closed-loop figures use the Python client"
	$(PY) bench/realtime_bench.py $(ARGS)

fuzz: $(STAMP) $(DEMO)/ctr.pt ## long HTTP fuzzing campaign against 2 workers (bench/results/fuzz.json; ARGS="--seconds N --examples N")
	$(PY) bench/fuzz.py $(ARGS)

# Several minutes with faults; on a shared machine: flock /tmp/sparkscore-bench.lock make soak
soak: $(STAMP) $(DEMO)/ctr.pt ## 2 workers + Redis at 70% of max for minutes: Redis restarts, 5 swaps, kill -9, SIGTERM (bench/results/soak.json)
	$(PY) bench/soak.py $(ARGS)

.PHONY: serve bench-realtime peers-venv fuzz soak
# --- end serving ---

# --- streaming ---
broker: $(STAMP) ## local Kafka-protocol broker (Tansu, in memory, no JVM) on 127.0.0.1:PORT (default 9092), in the foreground
	$(PY) -m streaming.broker --kind tansu --port $(PORT)

kafka: $(STAMP) $(KAFKA_JARS) ## Apache Kafka (one KRaft node, temp log dir) on 127.0.0.1:PORT (default 9092), in the foreground
	$(PY) -m streaming.broker --kind kafka --port $(PORT)

# Tansu by default: no JVM broker to wait for (it starts in well under a second, Apache Kafka in 10-20 s).
BROKER ?= tansu
stream-demo: $(STAMP) $(DEMO)/ctr.pt ## broker + demo events + the stream job for 60 s, printing predictions (BROKER=kafka: Apache Kafka)
	@if [ "$(BROKER)" = kafka ]; then $(MAKE) --no-print-directory $(KAFKA_JARS); fi
	$(PY) -m streaming.demo --seconds 60 --rate 200 --broker $(BROKER)

# Faust, the benchmark's peer, pins click/aiohttp versions the project venv does not allow: its own venv.
# A .pth file lets it import the project and its venv's packages (torch, pyarrow) after Faust's own.
FAUST_VENV := build/faust-venv
$(FAUST_VENV)/.installed: bench/faust-constraints.txt $(STAMP)
	rm -rf $(FAUST_VENV)
	python3 -m venv $(FAUST_VENV)
	$(FAUST_VENV)/bin/pip install --quiet -c bench/faust-constraints.txt faust-streaming
	$(PY) -c "import sysconfig; print('$(abspath .)'); print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(FAUST_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_sparkscore.pth"
	touch $@

# Each variant and phase gets a fresh local broker; takes about 15 minutes. On a shared machine run it
# under the benchmark lock: flock /tmp/sparkscore-bench.lock make bench-stream
bench-stream: $(STAMP) $(DEMO)/ctr.pt jars ## streaming benchmark: both sources vs a 2-process plain loop and Faust on Apache Kafka (bench/results/stream.json and .png; ARGS="--broker tansu ...")
	@# A Faust venv that cannot be built is not fatal: the bench records why Faust did not run.
	@$(MAKE) --no-print-directory $(FAUST_VENV)/.installed > build/faust-venv.log 2>&1 \
	  || echo "the Faust venv could not be built (build/faust-venv.log); the bench runs without Faust"
	$(PY) bench/stream_bench.py $(ARGS)

# Kills the task or the driver at each named point of a batch (streaming/faults.py), restarts, and
# counts the records per event; plus zombies, retention, expired offsets and a delivery timeout.
faults: setup jars ## fault-injection suite on Apache Kafka, both sources, driver killed for real (bench/results/faults.json)
	rm -f bench/results/faults.json
	SPARKSCORE_FAULTS_JSON=$(abspath bench/results/faults.json) $(PY) -m pytest -q $(PYTEST_PARALLEL) \
	  tests/streaming/test_faults.py tests/streaming/test_faults_driver.py tests/streaming/test_sink.py \
	  tests/streaming/test_stream_job.py::test_kill_9_mid_stream_then_restart_leaves_exactly_one_record_per_event \
	  tests/streaming/test_broker_lost.py::test_a_stopped_apache_kafka_broker_is_one_sentence_never_data_loss_and_no_stack_overflow \
	  -k "not tansu"
	@cat bench/results/faults.json

bench-brokers: $(STAMP) jars ## launch-to-serving time of Tansu and Apache Kafka (bench/results/brokers.json and .png)
	$(PY) bench/broker_start.py $(ARGS)

.PHONY: broker kafka stream-demo bench-stream faults bench-brokers
# --- end streaming ---

# --- onnx ---
# Full run (about 15-25 minutes): flock /tmp/sparkscore-bench.lock make bench-onnx
bench-onnx: $(STAMP) ## ONNX Runtime vs PyTorch, batch and real-time (onnx key of bench/results/batch.json and realtime.json, onnx.png; ARGS="--rows N ...")
	$(PY) bench/onnx_bench.py $(ARGS)

.PHONY: bench-onnx
# --- end onnx ---

# --- batch: GPU ---
gpu-check: $(STAMP) ## on a CUDA host: the batch job and batch bench on the GPU (bench/results/gpu.json); else says so
	$(PY) bench/gpu_check.py $(ARGS)

.PHONY: gpu-check
# --- end batch: GPU ---
