"""Raw GET bandwidth of the store: what a restore could get at best.

Uploads one large object, then downloads it (a) as one stream and (b) in
16 MiB ranged GETs, 8 at a time (the part size and parallelism of sqlrepl's
restore; Litestream's restore also defaults to 8-way parallelism). Bytes are
read into memory and dropped: no disk writes, no checksums, so this is an
upper bound for any restore from the same store on the same machine.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import aiobotocore.session
from aiobotocore.config import AioConfig

__all__ = ["measure_get_bandwidth"]

PART = 16 << 20


def _client(session: Any, endpoint: str, key: str, secret: str, pool: int) -> Any:
    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=AioConfig(
            s3={"addressing_style": "path"},
            max_pool_connections=pool,
            read_timeout=300,
            retries={"mode": "standard", "max_attempts": 3},
        ),
    )


async def _measure(
    endpoint: str, key: str, secret: str, bucket: str, size: int, parallel: int, trials: int
) -> dict[str, Any]:
    session = aiobotocore.session.get_session()
    obj = "bench-bandwidth/object.bin"
    chunk = os.urandom(PART)
    async with _client(session, endpoint, key, secret, parallel + 2) as s3:
        t0 = time.monotonic()
        up = await s3.create_multipart_upload(Bucket=bucket, Key=obj)
        parts = []
        for i, start in enumerate(range(0, size, PART), 1):
            body = chunk[: min(PART, size - start)]
            r = await s3.upload_part(Bucket=bucket, Key=obj, UploadId=up["UploadId"], PartNumber=i, Body=body)
            parts.append({"ETag": r["ETag"], "PartNumber": i})
        await s3.complete_multipart_upload(
            Bucket=bucket, Key=obj, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
        )
        upload_seconds = time.monotonic() - t0

        async def single() -> float:
            t = time.monotonic()
            r = await s3.get_object(Bucket=bucket, Key=obj)
            got = 0
            async with r["Body"] as body:
                while True:
                    data = await body.read(1 << 20)
                    if not data:
                        break
                    got += len(data)
            assert got == size, (got, size)
            return time.monotonic() - t

        async def ranged() -> float:
            sem = asyncio.Semaphore(parallel)

            async def part(start: int) -> int:
                async with sem:
                    end = min(size, start + PART) - 1
                    r = await s3.get_object(Bucket=bucket, Key=obj, Range=f"bytes={start}-{end}")
                    async with r["Body"] as body:
                        return len(await body.read())

            t = time.monotonic()
            got = sum(await asyncio.gather(*(part(s) for s in range(0, size, PART))))
            assert got == size, (got, size)
            return time.monotonic() - t

        singles, rangeds = [], []
        for _ in range(trials):
            singles.append(await single())
            rangeds.append(await ranged())
        await s3.delete_object(Bucket=bucket, Key=obj)

    def rates(seconds: list[float]) -> dict[str, float]:
        mbps = sorted(size / s / 1e6 for s in seconds)
        return {"median": statistics.median(mbps), "min": mbps[0], "max": mbps[-1]}

    return {
        "object_bytes": size,
        "part_bytes": PART,
        "parallel": parallel,
        "trials": trials,
        "upload_MBps": size / upload_seconds / 1e6,
        "single_stream_MBps": rates(singles),
        "parallel_ranged_MBps": rates(rangeds),
    }


def measure_get_bandwidth(
    endpoint: str, key: str, secret: str, bucket: str, size: int, *, parallel: int = 8, trials: int = 3
) -> dict[str, Any]:
    """MB/s (10^6 bytes) of single-stream and parallel ranged GETs of a ``size``-byte object."""
    return asyncio.run(_measure(endpoint, key, secret, bucket, size, parallel, trials))
