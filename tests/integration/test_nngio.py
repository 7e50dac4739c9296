"""nng I/O off the trio thread: the sending and receiving threads, and packing batches."""

import msgpack
import pynng
import pytest
import trio

from fanroute.localcluster import free_port
from fanroute.nngio import Receiver, Sender, pack_all
from tests.support import DEADLINE


def test_a_batch_is_one_message_unless_it_would_be_too_large():
    frames = [[4, f"t{i}", b"x" * 100] for i in range(1000)]
    (one,) = pack_all(msgpack.packb, frames)
    assert msgpack.unpackb(one) == frames
    several = pack_all(msgpack.packb, frames, most=20_000)
    assert 1 < len(several) <= 16
    assert all(len(m) <= 20_000 for m in several)
    assert [f for m in several for f in msgpack.unpackb(m)] == frames  # nothing lost, in order


@pytest.fixture
def pair():
    url = f"tcp://127.0.0.1:{free_port()}"
    pull = pynng.Pull0(recv_buffer_size=128)
    pull.listen(url)
    push = pynng.Push0(send_buffer_size=64)
    yield url, push, pull
    push.close()
    pull.close()


async def _until(pred):
    with trio.fail_after(DEADLINE):
        while not pred():
            await trio.sleep(0.01)


async def test_one_batch_takes_every_message_that_has_arrived(pair):
    url, push, pull = pair
    push.dial(url, block=True)
    sender, receiver = Sender(push, "test"), Receiver(pull, "test")
    for i in range(50):
        sender.send(b"m%d" % i)
    await _until(lambda: len(receiver._arrived) == 50)
    assert await receiver.batch() == [b"m%d" % i for i in range(50)]
    sender.send(b"later")
    assert await receiver.batch() == [b"later"]
    sender.close()


async def test_a_sender_whose_peer_is_not_there_holds_its_caller_back_until_it_comes(pair):
    url, push, pull = pair
    sender = Sender(push, "test", limit=2)
    push.dial(url, block=False)
    pull.close()  # nobody to take them: nng's queue fills, then the thread blocks
    for i in range(200):
        sender.send(b"x")
    await _until(lambda: sender.pending >= 2)
    with trio.move_on_after(0.2) as waited:
        await sender.room()
    assert waited.cancelled_caught  # still no room
    late = pynng.Pull0(recv_buffer_size=128)
    late.listen(url)
    receiver = Receiver(late, "late")
    got = 0
    with trio.fail_after(DEADLINE):
        await sender.room()
        while got < 200 - 64:  # what nng queued before the first peer left may be gone
            got += len(await receiver.batch())
    sender.close()
    late.close()


async def test_a_closed_socket_ends_the_receiver(pair):
    url, push, pull = pair
    receiver = Receiver(pull, "test")
    pull.close()
    with trio.fail_after(DEADLINE), pytest.raises(trio.ClosedResourceError):
        await receiver.batch()
