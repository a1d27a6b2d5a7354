"""One conformance suite that every replica backend must pass.

Each test runs against memory://, file:// (a temporary folder) and s3://
(a real SeaweedFS server, with a 5 MiB multipart threshold so that
``put_file`` of a larger file goes multipart). A backend is added by adding
it to ``BACKENDS``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from sqlrepl._errors import ObjectNotFoundError, ReplicaError
from sqlrepl._replica import ObjectInfo, ReplicaClient, open_replica

MiB = 1 << 20

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("file", id="file"),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
]


@pytest.fixture(params=BACKENDS)
def replica_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty replica of each backend."""
    if request.param == "memory":
        return f"memory://conformance-{secrets.token_hex(6)}"
    if request.param == "file":
        return (tmp_path / "replica").as_uri()
    # Asked for lazily, so memory and file runs never start SeaweedFS.
    s3_url: str = request.getfixturevalue("s3_url")
    return s3_url + "&multipart_threshold=5MiB&part_size=5MiB"


@pytest_asyncio.fixture
async def replica(replica_url: str) -> AsyncIterator[ReplicaClient]:
    """An open client of ``replica_url``, closed after the test."""
    client = open_replica(replica_url)
    try:
        yield client
    finally:
        await client.aclose()


def payload(size: int) -> bytes:
    """``size`` random bytes, so a misplaced range or part shows."""
    return os.urandom(size)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [0, 1, 3 * MiB + 7], ids=["empty", "1-byte", "3MiB"])
async def test_put_get_round_trip(replica: ReplicaClient, size: int) -> None:
    """An object reads back byte for byte, from empty to several MiB."""
    data = payload(size)
    await replica.put("segments/0001", data)
    assert await replica.get("segments/0001") == data


@pytest.mark.asyncio
async def test_overwrite_replaces_object(replica: ReplicaClient) -> None:
    """A second put under the same key replaces the first, also with a shorter object."""
    await replica.put("position", b"first version, longer")
    await replica.put("position", b"second")
    assert await replica.get("position") == b"second"
    assert await replica.list("position") == [ObjectInfo("position", 6)]


@pytest.mark.asyncio
async def test_get_missing_key_raises_object_not_found(replica: ReplicaClient) -> None:
    """A missing key raises ObjectNotFoundError naming the key and the replica."""
    await replica.put("present", b"x")
    with pytest.raises(ObjectNotFoundError, match="absent/key") as info:
        await replica.get("absent/key")
    assert info.value.transient is False
    assert info.value.replica


@pytest.mark.asyncio
async def test_get_range(replica: ReplicaClient) -> None:
    """get_range returns the middle, a short tail at the end, and nothing past the end."""
    data = payload(1000)
    await replica.put("blob", data)
    assert await replica.get_range("blob", 100, 50) == data[100:150]
    assert await replica.get_range("blob", 0, 1) == data[:1]
    assert await replica.get_range("blob", 990, 100) == data[990:]
    assert await replica.get_range("blob", 1000, 10) == b""
    assert await replica.get_range("blob", 5000, 10) == b""


@pytest.mark.asyncio
async def test_get_range_of_missing_key_raises(replica: ReplicaClient) -> None:
    """get_range of a missing key raises ObjectNotFoundError, not an empty result."""
    with pytest.raises(ObjectNotFoundError):
        await replica.get_range("nothing-here", 0, 10)


@pytest.mark.asyncio
async def test_list_prefix_sorted_relative(replica: ReplicaClient) -> None:
    """list filters by a prefix (also mid-name), returns relative keys sorted, with sizes."""
    keys = ["gen/b/seg/2", "gen/a/snap", "gen/a/seg/10", "gen/a/seg/1", "gen/ab", "other", "gen/a/seg/1x"]
    for i, key in enumerate(keys):
        await replica.put(key, b"v" * i)
    sizes = dict(zip(keys, range(len(keys)), strict=True))

    everything = await replica.list()
    assert [o.key for o in everything] == sorted(keys)
    assert all(o.size == sizes[o.key] for o in everything)
    under_a = ["gen/a/seg/1", "gen/a/seg/10", "gen/a/seg/1x", "gen/a/snap"]
    assert [o.key for o in await replica.list("gen/a/")] == under_a
    assert [o.key for o in await replica.list("gen/a")] == [*under_a, "gen/ab"]
    assert [o.key for o in await replica.list("gen/a/seg/1")] == under_a[:3]
    assert await replica.list("nope/") == []


@pytest.mark.asyncio
async def test_list_of_empty_replica_is_empty(replica: ReplicaClient) -> None:
    """An empty (even never-written) replica lists as empty, not as an error."""
    assert await replica.list() == []


@pytest.mark.asyncio
async def test_nested_and_unusual_keys(replica: ReplicaClient) -> None:
    """Deeply nested keys and keys with spaces, '+', '%' and non-ASCII round-trip."""
    keys = ["a/b/c/d/e/f", "with space/x+y%20z", "ünïcødé/ключ"]
    for key in keys:
        await replica.put(key, key.encode())
    for key in keys:
        assert await replica.get(key) == key.encode()
    assert [o.key for o in await replica.list()] == sorted(keys)


@pytest.mark.asyncio
async def test_list_and_delete_many_keys(replica: ReplicaClient) -> None:
    """Over 1,000 keys (an S3 page, a DeleteObjects batch) list completely and delete in one call."""
    keys = [f"many/{i:05d}" for i in range(1100)]
    semaphore = asyncio.Semaphore(32)

    async def put(key: str) -> None:
        async with semaphore:
            await replica.put(key, key.encode())

    await asyncio.gather(*(put(k) for k in keys))
    before = replica.stats.requests["LIST"]
    listed = await replica.list("many/")
    assert [o.key for o in listed] == keys
    assert replica.stats.requests["LIST"] >= before + 1

    await replica.delete(keys)
    assert await replica.list("many/") == []


@pytest.mark.asyncio
async def test_delete_present_and_absent_keys(replica: ReplicaClient) -> None:
    """delete removes present keys, ignores absent ones, and leaves other keys alone."""
    await replica.put("keep", b"1")
    await replica.put("drop/one", b"2")
    await replica.put("drop/two", b"3")
    await replica.delete(["drop/one", "never-existed", "drop/two", "drop/one"])
    assert [o.key for o in await replica.list()] == ["keep"]
    with pytest.raises(ObjectNotFoundError):
        await replica.get("drop/one")
    await replica.delete([])
    await replica.delete(["never-existed"])
    assert await replica.get("keep") == b"1"


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [1000, 11 * MiB + 123], ids=["small", "multipart"])
async def test_put_file(replica: ReplicaClient, tmp_path: Path, size: int) -> None:
    """put_file stores a file's bytes exactly, small (one PUT) or large (multipart on S3)."""
    data = payload(size)
    source = tmp_path / "snapshot.bin"
    source.write_bytes(data)
    await replica.put_file("snapshots/0001", source)
    assert await replica.get("snapshots/0001") == data
    assert await replica.list("snapshots/") == [ObjectInfo("snapshots/0001", size)]
    assert await replica.get_range("snapshots/0001", size - 10, 10) == data[-10:]


@pytest.mark.asyncio
async def test_put_file_missing_source_raises(replica: ReplicaClient, tmp_path: Path) -> None:
    """put_file of a missing local file raises rather than reporting success, and stores nothing."""
    with pytest.raises((OSError, ReplicaError)):
        await replica.put_file("k", tmp_path / "no-such-file")
    assert await replica.list() == []


@pytest.mark.asyncio
async def test_stats_count_requests_and_bytes(replica: ReplicaClient) -> None:
    """stats count one PUT/GET per small object call, LIST and DELETE requests, and bytes moved."""
    stats = replica.stats
    start = stats.as_dict()
    await replica.put("a", b"12345")
    await replica.put("b", b"678")
    assert await replica.get("a") == b"12345"
    assert await replica.get_range("b", 1, 1) == b"7"
    await replica.list()
    await replica.delete(["a", "b"])
    now = stats.as_dict()

    def delta(name: str) -> int:
        return now.get(name, 0) - start.get(name, 0)

    assert delta("PUT") == 2
    assert delta("GET") == 2
    assert delta("LIST") == 1
    assert 1 <= delta("DELETE") <= 2  # one per key, or one batch
    assert delta("bytes_up") == 8
    assert delta("bytes_down") == 6
    assert delta("errors") == 0


@pytest.mark.asyncio
async def test_check_succeeds_on_usable_replica(replica: ReplicaClient) -> None:
    """check() passes on a reachable replica and leaves no object behind."""
    await replica.check()
    assert await replica.list() == []


@pytest.mark.asyncio
async def test_aclose_leaves_no_tasks_or_sessions(replica_url: str) -> None:
    """After aclose() no task of the client is pending and no HTTP session is open."""
    client = open_replica(replica_url)
    assert isinstance(client, ReplicaClient)
    await client.put("k", b"v")
    assert await client.get("k") == b"v"
    await client.aclose()
    await client.aclose()  # idempotent
    others = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    assert others == set()
    del client
    gc.collect()
    unclosed = [
        o
        for o in gc.get_objects()
        if isinstance(o, aiohttp.ClientSession | aiohttp.BaseConnector) and not o.closed
    ]
    assert unclosed == []
