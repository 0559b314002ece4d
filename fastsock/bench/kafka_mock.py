"""librdkafka's mock cluster as a broker of its own, for the tests and ``bench/sinks.py``: made
through its C API (``rdkafka_mock.h``, loaded with ctypes from the librdkafka that
confluent-kafka ships), so that it belongs to no producer.  The tests stop and start it in
their own process; ``python -m fastsock.bench.kafka_mock`` runs it as a broker process (it
prints its bootstrap servers and lives until its standard input closes), so that the bench
can pin it to the broker's CPU and count its CPU apart, like redis-server's.  It listens on
loopback ports, where the sink under test (in this process or in a ``fastsock serve`` child)
and the reader connect to it as to any Kafka broker; ``stop`` closes every connection and
refuses new ones, ``start`` accepts them again on the same ports, and the partitions keep
what they held.  Unlike a real broker, the mock checks producer sequence numbers for
transactional producers only: it appends again what an idempotent producer retries after a
lost reply, so a test that wants no duplicate takes the brokers down while no reply is
outstanding."""

import argparse
import ctypes
import ctypes.util
import pathlib
import sys

import confluent_kafka

PRODUCER = 0
"""rd_kafka_type_t RD_KAFKA_PRODUCER: the client instance the cluster runs under; it connects
to nothing itself."""
ALL_BROKERS = -1
ERRSTR_SIZE = 512


def _librdkafka():
    """The librdkafka confluent-kafka runs on: the copy inside its wheel, else the system's
    (a confluent-kafka built from source links that one)."""
    package = pathlib.Path(confluent_kafka.__file__).parent
    shipped = sorted(package.parent.glob("confluent_kafka.libs/librdkafka*.so*"))
    path = str(shipped[0]) if shipped else ctypes.util.find_library("rdkafka")
    if path is None:
        raise RuntimeError(
            "no librdkafka found: neither in confluent-kafka's wheel nor on the system"
        )
    library = ctypes.CDLL(path)
    for name, result, arguments in (
        ("rd_kafka_conf_new", ctypes.c_void_p, []),
        ("rd_kafka_conf_set", ctypes.c_int,
         [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]),
        ("rd_kafka_new", ctypes.c_void_p,
         [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
        ("rd_kafka_destroy", None, [ctypes.c_void_p]),
        ("rd_kafka_mock_cluster_new", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
        ("rd_kafka_mock_cluster_bootstraps", ctypes.c_char_p, [ctypes.c_void_p]),
        ("rd_kafka_mock_cluster_destroy", None, [ctypes.c_void_p]),
        ("rd_kafka_mock_broker_set_down", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int32]),
        ("rd_kafka_mock_broker_set_up", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int32]),
        ("rd_kafka_mock_broker_set_rtt", ctypes.c_int,
         [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int]),
    ):  # fmt: skip
        function = getattr(library, name)
        function.restype, function.argtypes = result, arguments
    return library


class KafkaMockCluster:
    """A mock Kafka cluster of brokers brokers on loopback (topics are created on first use,
    with the mock's default partition count), as a context manager; ``bootstrap_servers`` is
    the "host:port,..." its clients take."""

    def __init__(self, brokers=1):
        self._library = library = _librdkafka()
        errstr = ctypes.create_string_buffer(ERRSTR_SIZE)
        conf = library.rd_kafka_conf_new()
        # Errors only: a broker going down is the test's doing, not news.
        if library.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, ERRSTR_SIZE) != 0:
            raise RuntimeError(errstr.value.decode())
        # rd_kafka_new owns conf from here, whether it succeeds or not.
        self._handle = library.rd_kafka_new(PRODUCER, conf, errstr, ERRSTR_SIZE)
        if not self._handle:
            raise RuntimeError(f"rd_kafka_new: {errstr.value.decode()}")
        self._cluster = library.rd_kafka_mock_cluster_new(self._handle, brokers)
        if not self._cluster:
            library.rd_kafka_destroy(self._handle)
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        self.bootstrap_servers = library.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()

    def stop(self):
        """Every broker down: connections closed, new ones refused (an outage)."""
        self._check("set_down", self._library.rd_kafka_mock_broker_set_down)

    def start(self):
        """Every broker up again, on the same ports, with the partitions as they were."""
        self._check("set_up", self._library.rd_kafka_mock_broker_set_up)

    def delay_replies(self, milliseconds):
        """Every broker holds each reply that long after handling its request: a request can
        be in the log and its reply still unsent when the broker goes down."""
        self._check("set_rtt", self._library.rd_kafka_mock_broker_set_rtt, milliseconds)

    def _check(self, what, function, *arguments):
        error = function(self._cluster, ALL_BROKERS, *arguments)
        if error:
            raise RuntimeError(f"rd_kafka_mock_broker_{what}: error {error}")

    def close(self):
        if self._cluster:
            self._library.rd_kafka_mock_cluster_destroy(self._cluster)
            self._library.rd_kafka_destroy(self._handle)
            self._cluster = self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def main():
    parser = argparse.ArgumentParser(
        description="librdkafka's mock Kafka cluster on loopback until standard input closes"
    )
    parser.add_argument("--brokers", type=int, default=1)
    options = parser.parse_args()
    with KafkaMockCluster(options.brokers) as cluster:
        print(cluster.bootstrap_servers, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
