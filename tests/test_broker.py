"""The broker transport: kombu's Redis transport with one command client per connection pool (agentsite/broker.py)."""

from __future__ import annotations

import pytest
from kombu import Exchange, Producer, Queue

from agentsite import broker
from agentsite.celery import app
from orchestration.bench import raw


@pytest.fixture
def channel():
    with app.connection_for_write() as connection:
        yield connection.default_channel


def test_the_celery_app_uses_it_for_its_redis_url_and_the_url_stays_redis():
    """Flower and the health check read the broker URL: it must still say redis://."""
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, broker.Transport)
        assert connection.as_uri().startswith("redis://")


def test_publishes_and_acks_share_one_client_per_pool(channel):
    first = channel._create_client()

    assert channel._create_client() is first
    assert channel.client is not first  # the blocking client for BRPOP stays its own


def test_a_new_pool_gets_a_new_client(channel):
    first = channel._create_client()
    channel._disconnect_pools()

    second = channel._create_client()

    assert second is not first
    assert second.connection_pool is channel.pool


def test_messages_go_through_it_to_redis_and_back(channel):
    queue = Queue("agentsite-broker-test", Exchange("agentsite-broker-test"), "agentsite-broker-test")
    queue(channel).declare()
    try:
        for n in range(3):
            Producer(channel).publish({"n": n}, exchange=queue.exchange, routing_key=queue.routing_key)
        received = [queue(channel).get(no_ack=False) for _ in range(3)]
        decoded = []
        for message in received:
            assert message is not None
            decoded.append(message.decode())
            message.ack()

        assert decoded == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert queue(channel).get() is None
    finally:
        queue(channel).delete()


def test_the_raw_celery_side_of_the_bench_keeps_kombus_own_transport():
    with raw.app.connection_for_write() as connection:
        assert type(connection.transport).__module__ == "kombu.transport.redis"
