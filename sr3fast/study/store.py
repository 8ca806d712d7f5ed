"""The answers of a study, in SQLite (`answers.sqlite` in the study folder).

Each answer is one committed transaction in WAL mode with full sync, so an answer the server
has acknowledged survives a closed tab, a killed server or a power cut. The primary key
(participant, trial) makes a second answer to the same trial impossible, even from two requests
racing each other. The database records the study's id and refuses to serve another study.

A connection is opened per operation: the server answers requests on several threads, and
SQLite connections are not to be shared between threads.
"""
from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS participants (
    id TEXT PRIMARY KEY,
    seed TEXT NOT NULL,                 -- the plan's seed (64-bit, as text: SQLite integers are signed)
    started_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    participant TEXT NOT NULL REFERENCES participants(id),
    trial TEXT NOT NULL,
    model_side TEXT NOT NULL CHECK (model_side IN ('left', 'right')),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right')),
    picked_model INTEGER NOT NULL CHECK (picked_model IN (0, 1)),
    response_ms INTEGER NOT NULL CHECK (response_ms >= 0),
    viewing_ms INTEGER,                 -- the fixed viewing time, NULL when unlimited
    answered_at TEXT NOT NULL,          -- UTC, ISO 8601
    PRIMARY KEY (participant, trial)
);
"""


class DuplicateAnswer(Exception):
    """The participant has already answered this trial."""


@dataclass(frozen=True)
class Answer:
    participant: str
    trial: str
    model_side: str
    choice: str
    picked_model: bool
    response_ms: int
    viewing_ms: int | None
    answered_at: str


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AnswerStore:
    """The answers database at `path`, created on first use for study `study_id`."""

    def __init__(self, path: str | Path, study_id: str):
        self.path = Path(path)
        self.study_id = study_id
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('study_id', ?)", (study_id,))
            (stored,) = db.execute("SELECT value FROM meta WHERE key = 'study_id'").fetchone()
        if stored != study_id:
            raise ValueError(f"{str(self.path)!r} holds the answers of another study ({stored}, not "
                             f"{study_id}); move it away to start this study afresh")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def start(self, participant: str, seed: int) -> None:
        """Register `participant` (nothing happens when they are known: a return visit)."""
        with closing(self._connect()) as db:
            db.execute("INSERT OR IGNORE INTO participants VALUES (?, ?, ?)", (participant, str(seed), now()))

    def known(self, participant: str) -> bool:
        with closing(self._connect()) as db:
            return db.execute("SELECT 1 FROM participants WHERE id = ?", (participant,)).fetchone() is not None

    def record(self, participant: str, trial: str, model_side: str, choice: str, response_ms: int,
               viewing_ms: int | None) -> Answer:
        """Store one answer, committed before returning; DuplicateAnswer when the participant has
        already answered the trial (the stored answer stays)."""
        answer = Answer(participant, trial, model_side, choice, choice == model_side, response_ms,
                        viewing_ms, now())
        with closing(self._connect()) as db:
            try:
                db.execute("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (answer.participant, answer.trial, answer.model_side, answer.choice,
                            int(answer.picked_model), answer.response_ms, answer.viewing_ms,
                            answer.answered_at))
            except sqlite3.IntegrityError as err:
                if "UNIQUE" in str(err) or "PRIMARY KEY" in str(err):
                    raise DuplicateAnswer(f"participant {participant!r} has already answered trial "
                                          f"{trial!r}") from None
                raise
        return answer

    def answered(self, participant: str) -> set[str]:
        """The ids of the trials `participant` has answered."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT trial FROM answers WHERE participant = ?", (participant,))
            return {trial for (trial,) in rows}

    def answers(self) -> list[Answer]:
        """Every stored answer, in the order they were given."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT participant, trial, model_side, choice, picked_model, response_ms, "
                              "viewing_ms, answered_at FROM answers ORDER BY answered_at, rowid")
            return [Answer(p, t, side, choice, bool(picked), ms, viewing, at)
                    for p, t, side, choice, picked, ms, viewing, at in rows]


def open_existing(path: str | Path, study_id: str) -> AnswerStore | None:
    """The answers database of a study for reading (None when nobody has answered yet)."""
    path = Path(path)
    return AnswerStore(path, study_id) if path.is_file() else None
