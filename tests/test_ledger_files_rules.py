"""The ledger's files before SQLite opens them: what each kind of damage is called, which
files are made private, and who holds the data directory.

Each refusal is the one line an operator reads at startup, so its words are the contract.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import BASE_MS, received
from ledger_helpers import prepare

from exporter.errors import (
    DataDirLockedError,
    LedgerCorruptError,
    LedgerUnavailableError,
    RecoveryPendingError,
)
from exporter.ledger import DataDirLock, Ledger, LedgerTuning, Submission, is_damage
from exporter.ledger.files import open_error

EVENTS = 300


def _fill(path: Path, first: int, count: int, tuning: LedgerTuning | None = None) -> Ledger:
    """Open the ledger at ``path`` and commit ``count`` payments numbered from ``first``."""
    ledger = Ledger(path, tuning=tuning)
    ledger.commit(
        [Submission([prepare(received(f"pay-{n}", BASE_MS + n)) for n in range(first, count)])]
    )
    return ledger


def _ledger(tmp_path: Path) -> Path:
    """A closed ledger of ``EVENTS`` events, its WAL copied into the file."""
    path = tmp_path / "data" / "ledger.sqlite3"
    _fill(path, 0, EVENTS).close()
    return path


def _recover_hint(path: Path) -> str:
    return f"facilitator-exporter recover --data-dir {path.parent}"


def _page_size(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:18], "big")


def _header_bytes(path: Path) -> int:
    """The size the file's header says it has (page count times page size)."""
    return int.from_bytes(path.read_bytes()[28:32], "big") * _page_size(path)


def _set_page_size_field(path: Path, value: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(16)
        handle.write(value.to_bytes(2, "big"))


def _set_page_count(path: Path, count: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(28)
        handle.write(count.to_bytes(4, "big"))


def _cut(path: Path, size: int) -> None:
    os.truncate(path, size)


def _cut_beside_an_empty_wal(path: Path, count: int) -> None:
    _cut(path, path.stat().st_size - count)
    path.with_name(path.name + "-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 28)


# (damage, the problem the refusal names, given the file's size before and after)
Damage = tuple[Callable[[Path], object], Callable[[Path, int], str]]
DAMAGE: dict[str, Damage] = {
    "empty": (lambda p: _cut(p, 0), lambda p, _: "the file is empty (0 bytes)"),
    "header-cut": (
        lambda p: _cut(p, 50),
        lambda p, _: "the file (50 bytes) does not start with an SQLite header",
    ),
    "header-zeroed": (
        lambda p: p.write_bytes(b"\0" * 100 + p.read_bytes()[100:]),
        lambda p, size: f"the file ({size} bytes) does not start with an SQLite header",
    ),
    "page-size-not-a-power-of-two": (
        lambda p: _set_page_size_field(p, 1000),
        lambda p, _: "the header names an invalid page size (1000)",
    ),
    "page-size-below-512": (
        lambda p: _set_page_size_field(p, 256),
        lambda p, _: "the header names an invalid page size (256)",
    ),
    "cut-mid-page": (
        lambda p: _cut(p, p.stat().st_size - 100),
        lambda p, size: (
            f"its size ({size - 100} bytes) is not a whole number of 4096-byte pages"
        ),
    ),
    "pages-appended": (
        lambda p: p.write_bytes(p.read_bytes() + b"\x01" * 8192),
        lambda p, size: (
            f"it is 8192 bytes longer than the {size} bytes its header describes "
            "(bytes were appended)"
        ),
    ),
    "pages-cut": (
        lambda p: _cut(p, p.stat().st_size - 8192),
        lambda p, size: (
            f"it is {size - 8192} bytes long but its header describes {size} bytes "
            "(the file was truncated)"
        ),
    ),
    "page-count-past-2**24": (
        # The count is four bytes: a damaged high byte makes it name a huge file.
        lambda p: _set_page_count(p, _header_bytes(p) // 4096 + 2**24),
        lambda p, size: (
            f"it is {size} bytes long but its header describes {size + 2**24 * 4096} bytes "
            "(the file was truncated)"
        ),
    ),
    "pages-cut-beside-an-empty-wal": (
        # A WAL of only its header holds no page: nothing can complete the file.
        lambda p: _cut_beside_an_empty_wal(p, 8192),
        lambda p, size: (
            f"it is {size - 8192} bytes long but its header describes {size} bytes "
            "(the file was truncated)"
        ),
    ),
}


@pytest.mark.parametrize("case", DAMAGE.values(), ids=DAMAGE.keys())
def test_each_kind_of_damage_is_named_in_the_refusal(tmp_path: Path, case: Damage) -> None:
    damage, problem = case
    path = _ledger(tmp_path)
    size = path.stat().st_size
    assert _header_bytes(path) == size
    damage(path)
    with pytest.raises(LedgerCorruptError) as caught:
        Ledger(path)
    assert str(caught.value) == (
        f"ledger file {path} is damaged: {problem(path, size)}. The exporter does not start "
        "on a damaged ledger (it would lose acknowledged events). Stop every process using "
        f"{path.parent}, then run `{_recover_hint(path)}` to move it aside (it is kept as "
        "ledger.sqlite3.damaged-<UTC time>) and commit every event that can still be read "
        "from it to a new ledger"
    )


@pytest.mark.parametrize("page_size", [512, 65536])
def test_a_ledger_of_the_smallest_or_largest_pages_opens_again(
    tmp_path: Path, page_size: int
) -> None:
    # SQLite writes 65,536 as 1 in the header's two bytes; 512 is the smallest size.
    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA page_size={page_size}")
        conn.execute("VACUUM")
    _fill(path, 0, 50).close()
    assert _page_size(path) == (1 if page_size == 65536 else page_size)
    ledger = _fill(path, 50, 100)
    try:
        assert ledger.stats().events == 100
    finally:
        ledger.close()


def _committed_frames(wal: Path, page_size: int) -> dict[int, bytes]:
    """The newest image of each page in ``wal`` (every frame of it committed)."""
    data = wal.read_bytes()
    pages: dict[int, bytes] = {}
    for at in range(32, len(data) - page_size - 23, 24 + page_size):
        number = int.from_bytes(data[at : at + 4], "big")
        pages[number] = data[at + 24 : at + 24 + page_size]
    return pages


def test_a_checkpoint_cut_short_after_its_first_page_is_not_damage(tmp_path: Path) -> None:
    # A checkpoint copies the WAL's pages into the file in page order: a crash after the
    # first leaves a header counting pages that only the WAL holds yet. SQLite completes
    # the file from the WAL; the exporter must not call it truncated.
    live = tmp_path / "live" / "ledger.sqlite3"
    _fill(live, 0, 50).close()
    slow = LedgerTuning(checkpoint_interval_seconds=3600.0)
    ledger = _fill(live, 50, 1000, slow)
    crashed = tmp_path / "crashed" / "ledger.sqlite3"
    crashed.parent.mkdir()
    try:
        for suffix in ("", "-wal"):
            target = crashed.with_name(crashed.name + suffix)
            shutil.copy(live.with_name(live.name + suffix), target)
    finally:
        ledger.close()
    page_size = _page_size(crashed)
    first_page = _committed_frames(crashed.with_name(crashed.name + "-wal"), page_size)[1]
    with open(crashed, "r+b") as handle:
        handle.write(first_page)
    assert crashed.stat().st_size < _header_bytes(crashed)
    reopened = Ledger(crashed)
    try:
        assert reopened.stats().events == 1000
    finally:
        reopened.close()


def test_a_wal_that_cannot_be_opened_is_not_called_damage(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    path.with_name(path.name + "-wal").mkdir()
    with pytest.raises(LedgerUnavailableError) as caught:
        Ledger(path)
    assert not isinstance(caught.value, LedgerCorruptError)
    assert str(caught.value) == (
        f"cannot open ledger file {path}: unable to open database file (the file, its "
        "-wal/-shm or its directory cannot be opened: check that they exist and that the "
        "exporter's user may read and write them). The file is not damaged: `recover` does "
        "not apply"
    )


def test_a_schema_page_sqlite_finds_damaged_is_named_as_damage(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    with open(path, "r+b") as handle:  # the header stays; the tables' catalogue does not
        handle.seek(100)
        handle.write(b"\xa5" * 3000)
    with pytest.raises(LedgerCorruptError) as caught:
        Ledger(path)
    assert str(caught.value).startswith(
        f"ledger file {path} is damaged: database disk image is malformed. The exporter "
        "does not start on a damaged ledger"
    )
    assert _recover_hint(path) in str(caught.value)


def _error(statement: str, closed: bool = False) -> sqlite3.Error:
    conn = sqlite3.connect(":memory:")
    if closed:
        conn.close()
    try:
        conn.execute(statement)
    except sqlite3.Error as error:
        return error
    finally:
        conn.close()
    raise AssertionError(f"{statement} did not fail")


def test_errors_without_a_hint_or_a_code_are_worded_plainly(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    plain = _error("SELECT * FROM missing")  # SQLITE_ERROR: no hint applies
    assert not is_damage(plain)
    assert str(open_error(path, plain)) == (
        f"cannot open ledger file {path}: no such table: missing. The file is not damaged: "
        "`recover` does not apply"
    )
    # Raised by Python's sqlite3 module itself: it carries no SQLite result code.
    uncoded = _error("SELECT 1", closed=True)
    assert not hasattr(uncoded, "sqlite_errorcode") and not is_damage(uncoded)
    assert str(open_error(path, uncoded)) == (
        f"cannot open ledger file {path}: Cannot operate on a closed database. The file is "
        "not damaged: `recover` does not apply"
    )


def test_a_ledger_path_that_cannot_be_read_is_named_with_its_cause(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.mkdir()
    with pytest.raises(LedgerUnavailableError) as caught:
        Ledger(path)
    assert str(caught.value) == (
        f"cannot read ledger file {path}: [Errno 21] Is a directory: '{path}'. The file is "
        "not damaged: `recover` does not apply"
    )


def test_an_unfinished_recovery_is_named_with_the_command_that_finishes_it(
    tmp_path: Path,
) -> None:
    path = _ledger(tmp_path)
    marker = path.with_name("ledger.sqlite3.recover-pending")
    marker.touch()
    with pytest.raises(RecoveryPendingError) as caught:
        Ledger(path)
    assert str(caught.value) == (
        f"a recovery of {path} was interrupted before it finished ({marker} exists): what "
        "is there may be only part of what the damaged file held. Run "
        f"`{_recover_hint(path)}` again to finish it"
    )


def _mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


def test_an_existing_data_dir_and_its_files_become_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    ledger_file = data_dir / "ledger.sqlite3"
    ledger_file.write_bytes(b"")
    ledger_file.chmod(0o644)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not the exporter's")
    outside.chmod(0o644)
    (data_dir / "link").symlink_to(outside)
    (data_dir / "sub").mkdir()
    (data_dir / "sub").chmod(0o755)  # whatever umask an earlier in-process `serve` left
    narrower = data_dir / "kept.txt"
    narrower.write_text("")
    narrower.chmod(0o400)
    DataDirLock(data_dir).release()
    assert _mode(narrower) == 0o400, "a file already closed to others keeps its mode"
    assert _mode(data_dir) == 0o700
    assert _mode(ledger_file) == 0o600
    assert _mode(outside) == 0o644, "a link is not followed"
    assert _mode(data_dir / "sub") == 0o755, "only files directly in it are changed"


def test_a_data_dir_is_made_with_its_parents_or_taken_as_it_is(tmp_path: Path) -> None:
    nested = tmp_path / "new" / "data"
    DataDirLock(nested).release()
    assert _mode(nested) == 0o700
    # Made by hand without its owner's search bit: it is still the exporter's to fix.
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    by_hand.chmod(0o660)
    DataDirLock(by_hand).release()
    assert _mode(by_hand) == 0o700


def test_files_of_another_user_are_left_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    shared = data_dir / "shared.txt"
    shared.write_text("")
    shared.chmod(0o644)
    owner = data_dir.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # the exporter runs as another user
    DataDirLock(data_dir).release()
    assert (_mode(data_dir), _mode(shared)) == (0o755, 0o644)


def test_a_ledger_reopened_with_wider_modes_is_made_private_again(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    ledger = Ledger(path)
    try:
        files = [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")]
        for file in files:
            file.chmod(0o644)
    finally:
        ledger.close()
    ledger = Ledger(path)
    try:
        assert [_mode(file) for file in files] == [0o600, 0o600, 0o600]
    finally:
        ledger.close()


def test_a_second_holder_in_the_same_process_is_refused_naming_the_first(
    tmp_path: Path,
) -> None:
    lock_file = tmp_path / ".lock"
    lock_file.write_text("99999999999\n")  # left by an exporter that is gone
    first = DataDirLock(tmp_path)
    assert lock_file.read_text() == str(os.getpid())
    with pytest.raises(DataDirLockedError) as caught:
        DataDirLock(tmp_path)
    assert str(caught.value) == (
        f"data directory {tmp_path} is in use by another exporter process (pid "
        f"{os.getpid()}, lock file {lock_file}); stop it or use another EXPORTER_DATA_DIR"
    )
    first.release()
    DataDirLock(tmp_path).release()


def test_a_holder_that_wrote_no_pid_is_named_unknown(tmp_path: Path) -> None:
    with open(tmp_path / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataDirLockedError, match=r"\(pid unknown, lock file "):
            DataDirLock(tmp_path)
