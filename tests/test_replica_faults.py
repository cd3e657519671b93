"""A pool replica that keeps dying ends the job with its cause, instead of a job that never ends.

Ray Data restarts a pool's actors without limit by default, and Ray's batch LLM processor ends
its engine's process on any fatal vLLM error so that Ray restarts it: an error every engine
start meets looped for good (a head_dim-16 teacher on CPU hung in generate for as long as it
was left). ``generation.max_replica_restarts`` bounds it, and the job then names the error vLLM
logged (kdray.pools.faults)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from kdray.errors import ModelError
from kdray.pools.faults import LOG_TAIL_BYTES, QUOTE_CHARS, logged_error, replica_death_error
from kdray.spec import parse_spec
from tests.specs import errors_of, minimal


def test_the_restart_limit_defaults_to_three_and_is_checked():
    assert parse_spec(minimal()).generation.max_replica_restarts == 3
    assert parse_spec(minimal(generation={"max_replica_restarts": -1})).generation.max_replica_restarts == -1
    errors = errors_of(minimal(generation={"max_replica_restarts": -2}))
    assert "-2 is not a number of restarts" in errors["generation.max_replica_restarts"]
    assert "or -1 to retry forever" in errors["generation.max_replica_restarts"]
    assert errors_of(minimal(generation={"max_replica_restarts": True}))["generation.max_replica_restarts"].startswith(
        "true is not a number of restarts")


def test_kdrays_own_pools_get_the_limit():
    """kdray's own pool classes (hf, the vLLM scorer) get it through their map_batches options; Ray's
    engine stage gets it on the processor (kdray.pools.vllm.generation_processor), which the job
    below shows: with the limit 0 it fails at the first death, where it restarted forever."""
    from kdray.pools.run import pool_options
    from kdray.spec import GenerationSpec

    assert pool_options(GenerationSpec(max_replica_restarts=5), "scorer")["max_restarts"] == 5
    assert pool_options(GenerationSpec(), "generator")["max_restarts"] == 3


def actor_died(udf: str = "vLLMEngineStageUDF", pid: int = 4242, ip: str = "10.0.0.7") -> Exception:
    """An exception holding Ray's ActorDiedError text for a pool actor, as a stage raises it."""
    from ray.exceptions import ActorDiedError

    error = ActorDiedError()
    error.error_msg = (f"The actor died unexpectedly before finishing this task.\n\tclass_name: MapWorker(MapBatches({udf}))\n"
            f"\tactor_id: 9f00\n\tpid: {pid}\n\tnamespace: x\n\tip: {ip}\nThe actor is dead because its worker "
            "process has died. Worker exit type: SYSTEM_ERROR")
    wrapper = RuntimeError("the stage failed")
    wrapper.__cause__ = error
    return wrapper


ENGINE_LOG = """(EngineCore pid=4300) INFO 12-05 20:15:40 [core.py:99] starting
(EngineCore pid=4300) ERROR 12-05 20:15:52 [core.py:1512] Traceback (most recent call last):
(EngineCore pid=4300) ERROR 12-05 20:15:52 [core.py:1512]   File "x.py", line 3, in build
(EngineCore pid=4300) ERROR 12-05 20:15:52 [core.py:1512] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
(MainProcess pid=4242) ERROR 12-05 20:15:52 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.
"""


def test_the_message_quotes_what_vllm_logged_on_this_node(tmp_path):
    (tmp_path / "worker-ab-01000000-4242.err").write_text("Downloading model and tokenizer.\n")
    (tmp_path / "worker-ab-01000000-4242.out").write_text(ENGINE_LOG)
    (tmp_path / "worker-cd-01000000-999.out").write_text(ENGINE_LOG.replace("CUDA out of memory", "another's"))
    error = replica_death_error(actor_died(), 3, tmp_path, "10.0.0.7")
    assert isinstance(error, ModelError)
    msg = str(error)
    assert msg.startswith("a vLLM engine of a generation pool died on node 10.0.0.7 after Ray restarted it 3 time(s), "
                          "as generation.max_replica_restarts allows: OutOfMemoryError: CUDA out of memory. Tried to "
                          "allocate 2.00 GiB (its log: "), msg  # the cause, not the EngineDeadError after it
    assert str(tmp_path / "worker-ab-01000000-4242.out") in msg and "run the job again (it resumes)" in msg

    # Another node's replica: its log is not here; the message says how to read it.
    msg = str(replica_death_error(actor_died(ip="10.0.0.9"), 0, tmp_path, "10.0.0.7"))
    assert "died on node 10.0.0.9 and generation.max_replica_restarts is 0 (its log on 10.0.0.9: " in msg, msg
    assert "`ray logs actor --pid 4242 --node-ip 10.0.0.9`" in msg and "out of memory." not in msg
    # A replica of kdray's own pool class, whose log holds no vLLM error: the logs are named.
    msg = str(replica_death_error(actor_died("HFGenerator", pid=999), 1, tmp_path, "10.0.0.7"))
    assert msg.startswith("a pool replica (HFGenerator) died on node 10.0.0.7 after Ray restarted it 1 time(s)"), msg
    (tmp_path / "worker-cd-01000000-999.out").write_text("Fatal Python error: Segmentation fault\n")
    msg = str(replica_death_error(actor_died("HFGenerator", pid=999), 1, tmp_path, "10.0.0.7"))
    assert f"(its logs: {tmp_path}/worker-*-999.out and .err)" in msg, msg
    # Not a pool's actor, or no actor's death at all: not this error.
    other = actor_died()
    other.__cause__.error_msg = other.__cause__.error_msg.replace("MapWorker(MapBatches(vLLMEngineStageUDF))", "Learner")
    assert replica_death_error(other, 3, tmp_path, "10.0.0.7") is None
    assert replica_death_error(ValueError("x"), 3, tmp_path, "10.0.0.7") is None


def test_only_the_end_of_a_long_log_is_read_and_a_long_error_is_cut(tmp_path):
    log = tmp_path / "worker-x-1.out"
    early = "(EngineCore pid=1) ERROR 12-05 20:00:00 [core.py:1] RuntimeError: an early one\n"
    late = "(EngineCore pid=1) ERROR 12-05 20:15:52 [core.py:1512] ValueError: " + "w" * (2 * QUOTE_CHARS) + "\n"
    log.write_text(early + "x" * LOG_TAIL_BYTES + "\n" + late)
    said = logged_error(log)
    assert said is not None and said.startswith("ValueError: www") and said.endswith("…") and len(said) == QUOTE_CHARS + 1
    assert logged_error(tmp_path / "missing.out") is None


@pytest.mark.slow
def test_an_engine_that_dies_at_its_first_request_fails_the_job_with_vllms_error(tmp_path, toy_world):
    """The real thing, as a user meets it: `kdray run` of a job whose teacher vLLM's CPU attention
    cannot run. kdray refuses such a model before its pool starts (kdray.pools.vllm.check_engine_support);
    with that check off, the engine starts, dies at its first request, and the job fails at once
    (max_replica_restarts 0) saying why, where it used to restart the engine for good."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdray.models import load_tokenizer, resolve_model

    teacher = tmp_path / "hd16"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                 vocab_size=len(load_tokenizer("toy:teacher")), max_position_embeddings=256)).save_pretrained(teacher)
    source = resolve_model("toy:teacher")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{source}/{name}", teacher / name)
    spec = minimal(name="faults", output_dir=str(tmp_path / "out"),
                   teacher={"model": str(teacher), "dtype": "float32", "max_model_len": 128},
                   student={"model": "toy:student", "dtype": "float32", "max_model_len": 128},
                   data={"train": "toy:train", "heldout": "toy:heldout", "max_train_samples": 8,
                         "max_heldout_samples": 8, "max_prompt_tokens": 64},
                   generation={"max_new_tokens": 4, "enforce_eager": True, "max_replica_restarts": 0},
                   training={"num_workers": 1, "global_batch_size": 8, "micro_batch_size_per_worker": 8})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    no_check = ("import sys, kdray.pools.vllm as v; v.check_engine_support = lambda *a: None; "
                "from kdray.cli import main; sys.exit(main(['run', sys.argv[1]]))")
    run = subprocess.run([sys.executable, "-c", no_check, str(path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert run.returncode == 2, run.stderr[-3000:]
    said = " ".join(run.stderr.split())
    assert "a vLLM engine of a generation pool died on node" in said, said[-3000:]
    assert "and generation.max_replica_restarts is 0: RuntimeError: Unsupported CPU attention configuration: head_dim=16" in said
    assert "Traceback" not in run.stderr
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "job_failed" and "head_dim=16" in events[-1]["error"], events[-1]


def test_a_pool_batch_that_does_not_fit_the_gpu_says_what_takes_less():
    """torch's out-of-memory error in a pool's batch (kdray's own pool classes: hf generators and
    scorers, the vLLM scorer) becomes a ClusterError naming the batch and the settings that take
    less; Ray passes it to the driver as text, which kdray.errors.user_error rebuilds."""
    import numpy as np
    import torch

    from kdray.errors import ClusterError, user_error
    from kdray.pools.base import PoolCallable

    class Crowded(PoolCallable):  # a pool whose GPU has no room for this batch
        def process(self, batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total "
                                         "capacity of 22.05 GiB of which 1.12 GiB is free.\nOf the allocated ...")

    with pytest.raises(ClusterError) as info:
        Crowded(env={})({"prompt": np.array(["a", "b", "c"]), "id": np.array(["1", "2", "3"])})
    msg = str(info.value)
    assert msg.startswith("a Crowded replica ran out of GPU memory on node "), msg
    assert ("(CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total capacity of 22.05 GiB of which 1.12 GiB "
            "is free.), on a batch of 3 rows. Lower generation.batch_size") in msg
    assert "Of the allocated" not in msg and "run the job again (it resumes)" in msg
    # As the driver gets it from a Ray Data task: its traceback's text.
    traced = type("RayTaskError", (Exception,), {"__module__": "ray.exceptions"})(
        f"ray::MapBatches(Crowded)() (pid=7, ip=10.0.0.3)\nTraceback ...\nkdray.errors.ClusterError: {msg}")
    rebuilt = user_error(traced)
    assert isinstance(rebuilt, ClusterError) and str(rebuilt) == f"{msg} (raised on the Ray worker at 10.0.0.3)"
