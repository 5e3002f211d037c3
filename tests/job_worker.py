"""A worker process for fault tests: ``python job_worker.py <gateway url> <api key> <kind>``.

It prints ``started <job_id> <attempt>`` when a job starts and then works on it forever, so a
test can SIGKILL it mid-job.
"""

from __future__ import annotations

import asyncio
import sys

from shoal.client import Worker, WorkerJob


async def main(url: str, key: str, kind: str) -> None:
    worker = Worker(url, key, name="doomed")

    @worker.handler(kind)
    async def forever(job: WorkerJob) -> None:
        print(f"started {job.job_id} {job.attempt}", flush=True)
        await asyncio.Event().wait()

    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
