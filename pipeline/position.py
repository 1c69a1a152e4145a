"""Where a loader stands in its epochs, saved and restored with DALI's checkpoint of the rank's pipeline."""

from __future__ import annotations

# What a saved position was drawn with: a loader that differs in any of them would yield other batches.
IDENTITY = ("rank", "seed", "world_size", "batch_size", "count")


class Position:
    """The next batch is `step` of `epoch`; `restore`, the DALI checkpoint to build the pipeline from; `anchor`,
    (DALI checkpoint, step) where this epoch's batches can be replayed from (None: the pipeline's very start)."""

    def __init__(self, steps_per_epoch: int, **identity):
        self.steps_per_epoch, self.identity = steps_per_epoch, identity
        self.epoch = self.step = 0
        self.restore, self.anchor = None, (None, 0)

    def state_dict(self, checkpoint: bytes | None) -> dict:
        """The position with `checkpoint`, DALI's of the running pipeline (None: not built, so `restore`)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "dali": self.restore if checkpoint is None else checkpoint,
            **self.identity,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in IDENTITY:
            if state[key] != self.identity[key]:
                raise ValueError(
                    f"loader state has {key} {state[key]}, this loader {self.identity[key]}: "
                    f"a resumed run would see other batches; resume with the original settings"
                )
        if state["dali"] is None and (state["epoch"], state["step"]) != (0, 0):
            raise ValueError(f"loader state at epoch {state['epoch']} step {state['step']} has no DALI checkpoint")
        self.epoch, self.step, self.restore = state["epoch"], state["step"], state["dali"]

    def built(self) -> None:
        """The pipeline now runs from `restore`: replays of this epoch start there."""
        self.anchor, self.restore = (self.restore, self.step), None

    def advance(self, checkpoint) -> None:
        """One batch yielded; at an epoch's end, `checkpoint()` (DALI's, ~0.2 ms) anchors the next epoch's replays."""
        self.step += 1
        if self.step == self.steps_per_epoch:  # DALI's reader has moved on to the next epoch by itself
            self.epoch, self.step = self.epoch + 1, 0
            self.anchor = (checkpoint(), 0)
