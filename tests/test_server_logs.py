"""client/server_logs.py on what a real TorchServe 0.12.0 wrote: a worker's reason to fail."""
from __future__ import annotations

from pathlib import Path

from client.server_logs import LogTail, worker_failure

# model_log.log of a real TorchServe 0.12.0 (this machine, tests' tiny model) registering an archive
# whose model-config.yaml asks for fp16 on a CPU worker: the handler's DeviceError, then TorchServe's
# own wrapper. model_service_worker.load_model maps every RuntimeError mentioning "CUDA" to "System out
# of memory", which is what the API then answers (HTTP 507), however much memory is free.
FP16_ON_CPU = """\
2026-12-03T15:27:35,267 [INFO ] W-53295-half_1-stdout MODEL_LOG - proceeding without onnxruntime
2026-12-03T15:27:35,267 [INFO ] W-53295-half_1-stdout MODEL_LOG - Torch TensorRT not enabled
2026-12-03T15:27:35,296 [INFO ] W-53295-half_1-stdout MODEL_LOG - Load model half cuda OOM, exception model-config.yaml handler.precision fp16: the CPU cannot run it: fp16 is served on CUDA only (CPU half kernels are slow or missing)
2026-12-03T15:27:35,297 [INFO ] W-53295-half_1-stdout MODEL_LOG - Traceback (most recent call last):
2026-12-03T15:27:35,297 [INFO ] W-53295-half_1-stdout MODEL_LOG -   File "/work/main/.venv/lib/python3.11/site-packages/ts/model_service_worker.py", line 133, in load_model
2026-12-03T15:27:35,298 [INFO ] W-53295-half_1-stdout MODEL_LOG -     service = model_loader.load(
2026-12-03T15:27:35,298 [INFO ] W-53295-half_1-stdout MODEL_LOG -               ^^^^^^^^^^^^^^^^^^
2026-12-03T15:27:35,298 [INFO ] W-53295-half_1-stdout MODEL_LOG -   File "/work/main/.venv/lib/python3.11/site-packages/ts/model_loader.py", line 143, in load
2026-12-03T15:27:35,298 [INFO ] W-53295-half_1-stdout MODEL_LOG -     initialize_fn(service.context)
2026-12-03T15:27:35,298 [INFO ] W-53295-half_1-stdout MODEL_LOG -   File "/tmp/rec19/b/logs/tmp/models/85c426e1f51e48989b68d111efaf40d2/classifier_handler.py", line 49, in initialize
2026-12-03T15:27:35,299 [INFO ] W-53295-half_1-stdout MODEL_LOG -     self.precision, reason = device.resolve_precision(self.settings.precision, self.device, self.reports)
2026-12-03T15:27:35,302 [INFO ] W-53295-half_1-stdout MODEL_LOG -                              ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
2026-12-03T15:27:35,305 [INFO ] W-53295-half_1-stdout MODEL_LOG -   File "/tmp/rec19/b/logs/tmp/models/85c426e1f51e48989b68d111efaf40d2/handler/device.py", line 135, in resolve_precision
2026-12-03T15:27:35,305 [INFO ] W-53295-half_1-stdout MODEL_LOG -     raise DeviceError(f"model-config.yaml handler.precision {requested}: {describe_device(device)} "
2026-12-03T15:27:35,306 [INFO ] W-53295-half_1-stdout MODEL_LOG - handler.device.DeviceError: model-config.yaml handler.precision fp16: the CPU cannot run it: fp16 is served on CUDA only (CPU half kernels are slow or missing)
2026-12-03T15:27:35,306 [INFO ] W-53295-half_1-stdout MODEL_LOG - Backend worker process died.
2026-12-03T15:27:35,306 [INFO ] W-53295-half_1-stdout MODEL_LOG - Traceback (most recent call last):
2026-12-03T15:27:35,306 [INFO ] W-53295-half_1-stdout MODEL_LOG -   File "/work/main/.venv/lib/python3.11/site-packages/ts/model_service_worker.py", line 301, in <module>
2026-12-03T15:27:35,306 [INFO ] W-53295-half_1-stdout MODEL_LOG -     worker.run_server()
2026-12-03T15:27:35,306 [INFO ] W-53295-half_1-stdout MODEL_LOG -   File "/work/main/.venv/lib/python3.11/site-packages/ts/model_service_worker.py", line 268, in run_server
2026-12-03T15:27:35,307 [INFO ] W-53295-half_1-stdout MODEL_LOG -     self.handle_connection(cl_socket)
2026-12-03T15:27:35,314 [INFO ] W-53295-half_1-stdout MODEL_LOG -   File "/work/main/.venv/lib/python3.11/site-packages/ts/model_service_worker.py", line 201, in handle_connection
2026-12-03T15:27:35,314 [INFO ] W-53295-half_1-stdout MODEL_LOG -     raise RuntimeError("{} - {}".format(code, result))
2026-12-03T15:27:35,314 [INFO ] W-53295-half_1-stdout MODEL_LOG - RuntimeError: 507 - System out of memory
"""
DEVICE_ERROR = ("handler.device.DeviceError: model-config.yaml handler.precision fp16: the CPU cannot run it: "
                "fp16 is served on CUDA only (CPU half kernels are slow or missing)")


def tail(tmp_path: Path, text: str) -> LogTail:
    log = tmp_path / "model_log.log"
    log.write_text(text)
    return LogTail(log, from_end=False)


def test_a_failed_load_is_quoted_by_its_cause_not_torchserves_507(tmp_path):
    assert "RuntimeError: 507 - System out of memory" in FP16_ON_CPU.splitlines()[-1]
    assert worker_failure(tail(tmp_path, FP16_ON_CPU), "half", "1") == DEVICE_ERROR


def test_the_cause_is_found_before_the_wrapper_is_written(tmp_path):
    # the API may answer before the log has its last lines: the cause alone is already the reason
    cut = FP16_ON_CPU[:FP16_ON_CPU.index("Backend worker process died")]
    cut = cut[:cut.rindex("\n") + 1]
    assert worker_failure(tail(tmp_path, cut), "half", "1") == DEVICE_ERROR


def test_each_restart_quotes_its_own_cause_and_other_workers_are_ignored(tmp_path):
    # TorchServe retries a failed worker: the latest failure counts; another model's lines never do
    other = FP16_ON_CPU.replace("half_1", "other_1").replace("DeviceError: model-config", "DeviceError: else")
    later = FP16_ON_CPU.replace("fp16 is served on CUDA only", "now something else")
    reason = worker_failure(tail(tmp_path, FP16_ON_CPU + later + other), "half", "1")
    assert reason == DEVICE_ERROR.replace("fp16 is served on CUDA only", "now something else")


def test_an_exception_without_torchserves_wrapper_is_quoted_as_it_is(tmp_path):
    # an exception other than RuntimeError leaves load_model uncaught: no wrapper follows it
    prefix = "2026-12-03T15:27:35,306 [INFO ] W-53295-half_1-stdout MODEL_LOG - "
    text = "".join(prefix + line + "\n" for line in (
        "Backend worker process died.", "Traceback (most recent call last):",
        "ValueError: model.pt outputs 3 classes but index_to_name.json names 4"))
    assert worker_failure(tail(tmp_path, text), "half", "1") == (
        "ValueError: model.pt outputs 3 classes but index_to_name.json names 4")
    only_wrapper = prefix + "RuntimeError: 500 - Unknown exception\n"
    assert worker_failure(tail(tmp_path, only_wrapper), "half", "1") == "RuntimeError: 500 - Unknown exception"
