"""``fastsock bench``: receive rates of fastsock against the stdlib, asyncio and C sinks.

Imported only when the command runs, never by ``import fastsock`` nor ``fastsock serve``.
``cli`` parses the command's arguments and runs it; ``coordinator`` drives the runs, each
with a server process (``server``) and a load generator process (``load``, which sends with
the compiled ``_loadgen``); ``catalogue`` describes the workloads and servers, and is all of
the benchmark those child processes import beside ``process`` (their JSON lines to the
coordinator); ``report`` prints the table and writes the JSON and the plot.  ``kafka_mock``
is librdkafka's mock Kafka cluster, for the sink tests and ``bench/sinks.py``.
"""
