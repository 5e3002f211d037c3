"""The Python partition function agrees with nats-server's {{partition(P,1)}} transform."""

from __future__ import annotations

import secrets

from nats.js import JetStreamContext

from shoal.common.messaging import Catalog, Subjects, new_id, partition, provision
from shoal.common.messaging.catalog import provision_stream
from shoal.common.settings import CommonSettings


async def test_partition_matches_server_transform(
    js: JetStreamContext, subject_prefix: str
) -> None:
    settings = CommonSettings(subject_prefix=subject_prefix, session_partitions=64)
    catalog = Catalog.from_settings(settings)
    await provision_stream(js, catalog.streams[0])
    subjects = Subjects(subject_prefix)
    ids = [new_id("ses") for _ in range(1500)] + [secrets.token_hex(8) for _ in range(1500)]
    for sid in ids:
        await js.publish(subjects.session_command(sid), b"{}")
    sub = await js.pull_subscribe(
        f"{subject_prefix}.session.cmd.>", durable="check", stream=subjects.session_cmd_stream
    )
    seen = 0
    mismatches = []
    while seen < len(ids):
        for msg in await sub.fetch(500, timeout=5):
            _, _, _, part, sid = msg.subject.split(".")
            if int(part) != partition(sid, 64):
                mismatches.append((sid, part))
            seen += 1
            await msg.ack()
    assert seen == len(ids)
    assert mismatches == []


async def test_provisioning_is_idempotent_and_keeps_data(
    js: JetStreamContext, subject_prefix: str
) -> None:
    settings = CommonSettings(subject_prefix=subject_prefix)
    catalog = Catalog.from_settings(settings)
    await provision(js, catalog)
    subjects = Subjects(subject_prefix)
    await js.publish(subjects.session_event("ses_a", "session.created"), b"{}")
    await provision(js, catalog)  # second start
    info = await js.stream_info(subjects.session_evt_stream)
    assert info.state.messages == 1
