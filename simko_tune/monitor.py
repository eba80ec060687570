"""TensorBoard logging: torchtune's logger plus the sample completions as text."""

from __future__ import annotations

from torchtune.training.metric_logging import TensorBoardLogger as _TorchtuneTensorBoardLogger


class TensorBoardLogger(_TorchtuneTensorBoardLogger):
    """torchtune's TensorBoard logger (rank 0 writes) that also logs Markdown text."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self._writer:
            self._writer.add_text(tag, text, global_step=step)
            self._writer.flush()

    def log_dict(self, payload, step: int) -> None:
        super().log_dict(payload, step)
        if self._writer:
            self._writer.flush()
