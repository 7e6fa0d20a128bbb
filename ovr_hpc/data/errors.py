"""The error of a record that cannot be used (data files, benchmark rows): its own module, so that the
readers (records.py), the image checks (vision.py) and the choice letters (ovr_hpc.grading) share it
without importing one another."""

from __future__ import annotations


class BadRecord(Exception):
    """A record that cannot be used. `kind` is a short code for counting."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message
