"""The action layer the API targets drive (api_json.py, api_http.py): kvmkit's `Vmm` with
only what would leave the process replaced, after every check of the request has run."""

from __future__ import annotations

import logging
from typing import Any

from common import scratch_dir

from kvmkit.api.actions import ApiError, Vmm

LOG_FILE = scratch_dir() / "api.log"
LOG_FILE.touch()
METRICS_FILE = scratch_dir() / "metrics.json"
METRICS_FILE.touch()


class Crash(BaseException):
    """An exception other than ApiError left the action layer: the router would have turned
    it into a 400 naming it, so it is raised past the router's `except Exception`."""


class FuzzVmm(Vmm):
    def request(self, method: str, path: str, body: Any = None, ident: str | None = None) -> Any:
        try:
            return super().request(method, path, body, ident)
        except ApiError:
            raise
        except Exception as err:
            raise Crash(f"{method} {path}: {type(err).__name__}: {err}") from err

    def _check_host(self) -> None:
        # InstanceStart and snapshot loads have checked the whole configuration by here;
        # the next step would build a VM.
        raise ApiError("fuzzing: no microVM is started")

    # The logger and metrics files: the fuzzed path must be the target's own file (the
    # request is otherwise checked as usual), so no input writes to a host file.
    def _put_logger(self, body: dict[str, Any]) -> None:
        if "log_path" in body and body["log_path"] != str(LOG_FILE):
            raise ApiError("fuzzing: log_path must be the target's file")
        super()._put_logger(body)

    def _put_metrics(self, body: dict[str, Any]) -> None:
        if body["metrics_path"] != str(METRICS_FILE):
            raise ApiError("fuzzing: metrics_path must be the target's file")
        super()._put_metrics(body)

    def close(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("kvmkit").removeHandler(self._log_handler)
            self._log_handler.close()
        self.metrics.close()
