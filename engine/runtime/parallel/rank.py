"""One rank's part of a model split over several: its share (layout.RankShare), the slices it reads,
its local config and its collectives; what engine/checkpoint/loader.load_model(part=...) takes."""

from __future__ import annotations

from dsv4.engine.model.config import DSV4Config

from .layout import RankShare, local_config, pick


class RankPart:
    """share: this rank's RankShare; comm: its collectives (comm.RankCollectives, or
    comm.NoCollectives for one rank measured alone). bytes_read: set by the loader."""

    def __init__(self, share: RankShare, comm):
        self.share, self.comm = share, comm
        self.bytes_read = 0

    def pick(self, cfg: DSV4Config, name: str):
        return pick(self.share, cfg, name)

    def config(self, cfg: DSV4Config) -> DSV4Config:
        return local_config(cfg, self.share)
