"""The text rule reaches websocket handshakes: a NUL in a topic slug is refused before routing
(on PostgreSQL the slug look-up failed)."""

from __future__ import annotations

import pytest
import websockets


async def test_nul_in_a_websocket_path_is_refused(live):
    for path in ("a%00b", "a%00b/consumer", "topic/sub%00"):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with live.connect(path):
                pass
        assert refused.value.response.status_code == 403
    slug = await live.create_topic(anonymous=True, supports_dasf=False)
    async with live.connect(slug) as producer:  # an ordinary slug still connects
        await producer.send('{"payload": "", "context": 1}')
        assert "ok" in await producer.recv()
