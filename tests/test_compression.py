"""detector.compression: bounded, streaming gzip decompression (gzip bombs, members, damage)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import pytest

from detector.compression import BUFFER_BYTES, gunzip_to, is_gzip
from detector.config import DEFAULT_MAX_DECOMPRESSED_BYTES, ConfigError, Settings
from detector.schema import InputError

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _csv_like(n_rows: int, seed: int = 0) -> bytes:
    """Text that compresses like a billing export (numbers vary, columns repeat)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = rng.integers(0, 100_000, size=(n_rows, 4))
    lines = [f"c{r[0]:06d},2019-01-{1 + r[1] % 28:02d},{r[2]},{r[3]},ELEC" for r in values]
    return ("client_id,invoice_date,a,b,counter_type\n" + "\n".join(lines) + "\n").encode()


def test_is_gzip_reads_the_magic_bytes(tmp_path: Path) -> None:
    assert is_gzip(_write(tmp_path / "a.gz", gzip.compress(b"x")))
    assert is_gzip(_write(tmp_path / "noname", gzip.compress(b"")))  # by content, not by name
    assert not is_gzip(_write(tmp_path / "b.csv.gz", b"client_id\n1\n"))
    assert not is_gzip(_write(tmp_path / "c", b"\x1f"))
    assert not is_gzip(_write(tmp_path / "d", b""))
    assert not is_gzip(_write(tmp_path / "e.parquet", b"PAR1...."))


@pytest.mark.parametrize("size", [0, 1, BUFFER_BYTES - 1, BUFFER_BYTES, 3 * BUFFER_BYTES + 17])
def test_round_trip_is_exact(tmp_path: Path, size: int) -> None:
    data = _csv_like(size // 30 + 1)[:size]
    assert len(data) == size
    source = _write(tmp_path / "in.csv.gz", gzip.compress(data, compresslevel=6))
    target = tmp_path / "out.csv"
    assert gunzip_to(source, target, max_bytes=size) == size  # the limit is inclusive
    assert target.read_bytes() == data


def test_concatenated_members_are_one_stream(tmp_path: Path) -> None:
    parts = [_csv_like(5_000, seed=k) for k in range(3)]
    # Members as `cat a.gz b.gz c.gz` or pigz write them, one of them empty, then zero padding.
    blob = b"".join(gzip.compress(p) for p in parts) + gzip.compress(b"") + b"\0" * 1000
    source = _write(tmp_path / "multi.gz", blob)
    target = tmp_path / "out"
    assert gunzip_to(source, target, max_bytes=10**9) == sum(map(len, parts))
    assert target.read_bytes() == b"".join(parts)
    # What the gzip command line gives for the same file, when it is installed.
    if (gz := _which("gzip")) is not None:
        done = subprocess.run([gz, "-dc", str(source)], capture_output=True, check=True)
        assert done.stdout == target.read_bytes()


def _which(program: str) -> str | None:
    import shutil

    return shutil.which(program)


def _damaged(data: bytes) -> dict[str, bytes]:
    good = gzip.compress(data)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    bad_crc = bytearray(good)
    bad_crc[-8] ^= 0x01  # CRC-32 of the trailer
    bad_length = bytearray(good)
    bad_length[-1] ^= 0x01  # ISIZE of the trailer
    return {
        "truncated in the data": good[: len(good) // 2],
        "truncated in the trailer": good[:-3],
        "truncated after the header": good[:10],
        "deflate data damaged": bytes(flipped),
        "CRC mismatch": bytes(bad_crc),
        "length mismatch": bytes(bad_length),
        "trailing garbage": good + b"PK\x03\x04 not a member",
        "second member truncated": good + gzip.compress(data)[:30],
    }


@pytest.mark.parametrize("case", list(_damaged(b"x").keys()))
def test_damaged_stream_is_a_clear_input_error(tmp_path: Path, case: str) -> None:
    data = _csv_like(20_000)
    source = _write(tmp_path / "export.csv.gz", _damaged(data)[case])
    target = tmp_path / "out.csv"
    with pytest.raises(InputError) as error:
        gunzip_to(source, target, max_bytes=10**9, name="2025-01/export.csv.gz")
    message = str(error.value)
    assert message.startswith("2025-01/export.csv.gz: the gzip stream is ")
    assert ("truncated" in message) if case.startswith(("truncated", "second")) else True
    assert "PK" not in message  # the decoder's reason, never the file's bytes
    assert not target.exists()  # no partial output is left to be read


@pytest.mark.parametrize("content", [b"", b"client_id,invoice_date\n", b"\x1f", b"PAR1xxxx"])
def test_not_gzip_is_refused(tmp_path: Path, content: bytes) -> None:
    source = _write(tmp_path / "plain.csv.gz", content)
    with pytest.raises(InputError, match=r"^plain\.csv\.gz: not a gzip stream"):
        gunzip_to(source, tmp_path / "out", max_bytes=100)
    assert not (tmp_path / "out").exists()


def test_output_over_the_limit_is_refused_at_the_limit(tmp_path: Path) -> None:
    data = _csv_like(200_000)  # about 6 MB
    source = _write(tmp_path / "big.csv.gz", gzip.compress(data))
    target = tmp_path / "out"
    assert gunzip_to(source, target, max_bytes=len(data)) == len(data)
    limit = len(data) - 1
    with pytest.raises(InputError) as error:
        gunzip_to(source, target, max_bytes=limit)
    assert str(error.value) == (
        f"big.csv.gz: decompresses to more than {limit} bytes; "
        "the limit is PTD_MAX_DECOMPRESSED_BYTES"
    )
    assert not target.exists()


def _bomb(path: Path, member_bytes: int = 64 * MiB, members: int = 64) -> int:
    """A gzip of `members` identical members of zeros: ~64 KiB each, 4 GiB inflated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = compressor.compress(b"\0" * member_bytes) + compressor.flush()
    path.write_bytes(member * members)
    return member_bytes * members


def test_gzip_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    source = tmp_path / "bomb.csv.gz"
    inflated = _bomb(source)
    assert source.stat().st_size * 500 < inflated  # a 1:1000 bomb
    limit = 256 * MiB
    target = tmp_path / "out"
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=f"more than {limit} bytes"):
            gunzip_to(source, target, max_bytes=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"Python allocations peaked at {peak / MiB:.1f} MiB"
    assert not target.exists()


def test_gzip_bomb_peak_rss_does_not_grow_with_the_input(tmp_path: Path) -> None:
    """In a fresh process (RSS is per process): decompressing 256 MiB and refusing a 4 GiB bomb
    both leave the peak RSS within a few buffers of where it started."""
    source = tmp_path / "bomb.gz"
    _bomb(source)
    plain = tmp_path / "plain.gz"
    _bomb(plain, member_bytes=16 * MiB, members=16)  # 256 MiB, under the limit
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from detector.compression import gunzip_to
        from detector.schema import InputError

        def peak_mib():  # VmHWM: this process's peak (ru_maxrss also counts the parent's)
            status = Path("/proc/self/status").read_text()
            return int(status.split("VmHWM:")[1].split()[0]) / 1024

        bomb, plain, out = (Path(p) for p in sys.argv[1:4])
        before = peak_mib()
        written = gunzip_to(plain, out, max_bytes=300 * 2**20)
        after_plain = peak_mib()
        try:
            gunzip_to(bomb, out, max_bytes=512 * 2**20)
            refused = False
        except InputError:
            refused = True
        print(json.dumps({"before": before, "plain": after_plain, "bomb": peak_mib(),
                          "written": written, "refused": refused}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(source), str(plain), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    assert figures["written"] == 256 * MiB and figures["refused"]
    # Generous: the buffers are 1 MiB; a decompression into memory would add 256-512 MiB.
    assert figures["plain"] - figures["before"] < 48, figures
    assert figures["bomb"] - figures["before"] < 48, figures


def test_setting_max_decompressed_bytes() -> None:
    assert Settings().max_decompressed_bytes == DEFAULT_MAX_DECOMPRESSED_BYTES == 4 * 1024**3
    env = {"PTD_MAX_DECOMPRESSED_BYTES": "1048576"}
    assert Settings.from_env(env).max_decompressed_bytes == MiB
    assert Settings.from_env({}).max_decompressed_bytes == DEFAULT_MAX_DECOMPRESSED_BYTES
    for bad in ("lots", "0", "-5"):
        with pytest.raises(ConfigError, match="PTD_MAX_DECOMPRESSED_BYTES"):
            Settings.from_env({"PTD_MAX_DECOMPRESSED_BYTES": bad})
