"""ferromp's ``multiprocessing.dummy.connection``: connections between threads.

The same API as ``ferromp.connection`` (Listener, Client, Pipe), built on ``queue.Queue``
instead of sockets. Objects travel by reference, never pickled, and an address is the
listener's backlog queue itself.
"""

__all__ = ['Client', 'Listener', 'Pipe']

from queue import Queue

# One family only, and no real address: a listener is reached through the object it
# returns as its address.
families = [None]


class Listener:

    def __init__(self, address=None, family=None, backlog=1):
        self._backlog_queue = Queue(backlog)

    def accept(self):
        return Connection(*self._backlog_queue.get())

    def close(self):
        self._backlog_queue = None

    @property
    def address(self):
        return self._backlog_queue

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.close()


def Client(address):
    # The client's outgoing queue is the server's incoming one and vice versa, so the
    # pair is posted crossed over.
    _in, _out = Queue(), Queue()
    address.put((_out, _in))
    return Connection(_in, _out)


def Pipe(duplex=True):
    # Always duplex: a one-way pipe would only hide the unused direction.
    a, b = Queue(), Queue()
    return Connection(a, b), Connection(b, a)


class Connection:

    def __init__(self, _in, _out):
        self._out = _out
        self._in = _in
        # Bound methods of the queues: no Python frame of ours on each message. The
        # *_bytes forms are the same calls, since nothing is serialised between threads.
        self.send = self.send_bytes = _out.put
        self.recv = self.recv_bytes = _in.get

    def poll(self, timeout=0.0):
        if self._in.qsize() > 0:
            return True
        if timeout is not None and timeout <= 0.0:
            return False
        # Waiting under the queue's own condition, with the emptiness re-checked while
        # it is held, means a put() landing between the check above and the wait cannot
        # be missed. timeout=None waits for a message, as a real Connection does.
        not_empty = self._in.not_empty
        with not_empty:
            return not_empty.wait_for(lambda: self._in._qsize() > 0, timeout)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.close()
