"""An edow worker in Python, on Confluent's Kafka client and its Avro serdes against the schema registry.

It serves one task type of the order example, `payment.charge`, the way any third-party worker does
(docs/security.md and the README say what it relies on):

- it consumes `<prefix>tasks.<type>` and its `.retry` topic in a consumer group, reads each `TaskRequested` with
  the registry's Avro deserializer, and runs the handler;
- it produces one `TaskResult` per task to `<prefix>results`, keyed by the workflow id with librdkafka's
  `murmur2_random` partitioner (what Java clients and edow use), idempotently, and waits for the broker's
  acknowledgement before it commits the task's offset: a crash redelivers a task, never loses one, and the
  orchestrator deduplicates results by task id;
- large values travel by reference (the claim check): an input holding `{"$edow_blob": KEY, "bytes": N}` is
  resolved from the blob store before the handler sees it, only for the reference's own workflow or a parent,
  and checked against the hash in its key; an output over the threshold is stored and sent as a reference;
- a record it cannot decode goes to `<topic>.dlq` as a `DeadLetter` with the reason, and the worker goes on.

    python worker.py --bootstrap-servers 127.0.0.1:9092 --schema-registry http://127.0.0.1:8081 \
        --schemas ../../../schemas/avro --blob-store /var/lib/edow/blobs
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from collections import OrderedDict

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

BLOB_FIELD = "$edow_blob"
MAX_REFERENCES = 256
MAX_NESTING = 4


class Permanent(Exception):
    """A failure another attempt cannot fix: reported with `retryable: false`."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def sha256_hex(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class BlobStore:
    """The local-directory blob store: the value of key `OWNER/HASH` is the JSON text in file DIR/OWNER/HASH."""

    def __init__(self, directory, threshold, max_bytes):
        self.directory = directory
        self.threshold = threshold
        self.max_bytes = max_bytes

    def resolve(self, reader, value, budget=None, nesting=0):
        budget = budget if budget is not None else {"references": MAX_REFERENCES, "bytes": self.max_bytes}
        if isinstance(value, dict):
            key = value.get(BLOB_FIELD)
            if isinstance(key, str):
                if nesting >= MAX_NESTING:
                    raise Permanent("blob_invalid", f"blob references nested more than {MAX_NESTING} deep")
                return self.resolve(reader, self.read(reader, key, budget), budget, nesting + 1)
            return {k: self.resolve(reader, v, budget, nesting) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(reader, v, budget, nesting) for v in value]
        return value

    def read(self, reader, key, budget):
        owner, _, digest = key.partition("/")
        if len(owner) != 64 or len(digest) != 64 or not all(c in "0123456789abcdef" for c in owner + digest):
            raise Permanent("blob_invalid", f"{key!r} is not a blob key (OWNER/HASH, SHA-256 in hex)")
        # A workflow reads its own blobs and its ancestors' (a child's id extends its parent's with `/`).
        parts = reader.split("/")
        readers = {sha256_hex("/".join(parts[:n])) for n in range(1, len(parts) + 1)}
        if owner not in readers:
            raise Permanent("blob_invalid", f"blob {key} belongs to another workflow")
        budget["references"] -= 1
        if budget["references"] < 0:
            raise Permanent("blob_invalid", f"more than {MAX_REFERENCES} blob references in one value")
        path = os.path.join(self.directory, owner, digest)
        try:
            with open(path, "rb") as stored:
                data = stored.read(budget["bytes"] + 1)
        except FileNotFoundError:
            raise Permanent("blob_invalid", f"blob {key} is not in the blob store (purged, or never stored)")
        except OSError as e:
            raise BlobUnavailable(f"reading blob {key}: {e}")
        if len(data) > budget["bytes"]:
            raise Permanent("blob_invalid", f"blob {key} is over the {self.max_bytes} bytes one value may read")
        budget["bytes"] -= len(data)
        if hashlib.sha256(data).hexdigest() != digest:
            raise Permanent("blob_invalid", f"blob {key} does not match its hash: it was altered in the store")
        return json.loads(data)

    def offload(self, owner, value):
        text = json.dumps(value, separators=(",", ":"))
        if len(text.encode("utf-8")) <= self.threshold:
            return text
        key = f"{sha256_hex(owner)}/{sha256_hex(text)}"
        path = os.path.join(self.directory, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(partial, path)  # atomic: a reader never sees half a value
        return json.dumps({BLOB_FIELD: key, "bytes": len(text.encode("utf-8"))})


class BlobUnavailable(Exception):
    """The store could not be read: retryable."""


def charge(task_input):
    """The `payment.charge` handler: charges the order's amount (here, pretends to)."""
    amount = task_input.get("amount", 0) if isinstance(task_input, dict) else 0
    if not isinstance(amount, (int, float)) or amount < 0:
        raise Permanent("card_declined", f"cannot charge an amount of {amount!r}")
    return {
        "charged": amount,
        "currency": task_input.get("currency", "EUR"),
        "input_bytes": len(json.dumps(task_input)),
        "by": "python",
    }


HANDLERS = {"payment.charge": charge}


def kafka_settings(args, **fixed):
    """The client's settings: any librdkafka property from `EDOW_KAFKA_<PROPERTY>` variables (as every edow
    binary reads them, e.g. EDOW_KAFKA_SECURITY_PROTOCOL=SASL_SSL), so the worker reaches a secured cluster
    configured the same way; then the settings its guarantee rests on, which no variable overrides."""
    settings = {}
    for name, value in os.environ.items():
        if name.startswith("EDOW_KAFKA_") and name not in ("EDOW_KAFKA_OPTIONS", "EDOW_KAFKA_CONFIG_FILE"):
            settings[name[len("EDOW_KAFKA_"):].lower().replace("_", ".")] = value
    settings.update(fixed)
    settings["bootstrap.servers"] = args.bootstrap_servers
    return settings


def registry_settings(args):
    """Confluent's registry client settings, from the variables edow's registry client reads."""
    settings = {"url": args.schema_registry}
    if os.environ.get("EDOW_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"):
        settings["basic.auth.user.info"] = os.environ["EDOW_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"]
    if os.environ.get("EDOW_SCHEMA_REGISTRY_CA_LOCATION"):
        settings["ssl.ca.location"] = os.environ["EDOW_SCHEMA_REGISTRY_CA_LOCATION"]
    return settings


def ensure_topics(args, names):
    """Creates the task topics this worker reads when they are missing (the orchestrator creates them too, when
    a definition using the type is deployed), with the partition count every edow process uses."""
    admin = AdminClient(kafka_settings(args))
    wanted = [NewTopic(n, num_partitions=args.task_partitions, replication_factor=args.replication_factor)
              for n in names]
    for name, created in admin.create_topics(wanted, operation_timeout=30).items():
        try:
            created.result()
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def now_ms():
    return int(time.time() * 1000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    env = os.environ.get
    parser.add_argument("--bootstrap-servers", default=env("EDOW_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    parser.add_argument("--schema-registry", default=env("EDOW_SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081"))
    parser.add_argument("--topic-prefix", default=env("EDOW_TOPIC_PREFIX", "edow."))
    parser.add_argument("--task", default="payment.charge", choices=sorted(HANDLERS))
    parser.add_argument("--group", default="edow-workers-python")
    parser.add_argument("--worker-id", default=f"python-{os.getpid()}")
    parser.add_argument("--schemas", default=os.path.join(os.path.dirname(__file__), "../../../schemas/avro"))
    parser.add_argument("--task-partitions", type=int, default=int(env("EDOW_TASK_PARTITIONS", 6)))
    parser.add_argument("--replication-factor", type=int, default=int(env("EDOW_REPLICATION_FACTOR", 1)))
    parser.add_argument("--blob-store", default=env("EDOW_BLOB_STORE"))
    parser.add_argument("--blob-threshold", type=int, default=int(env("EDOW_BLOB_THRESHOLD", 64 * 1024)))
    parser.add_argument("--blob-max-bytes", type=int, default=int(env("EDOW_BLOB_MAX_BYTES", 64 * 1024 * 1024)))
    args = parser.parse_args()
    if args.blob_store and args.blob_store.startswith("s3://"):
        sys.exit("this example reads local blob stores only; use boto3 for s3:// the same way")
    blobs = None
    if args.blob_store:
        directory = args.blob_store.removeprefix("file://")
        blobs = BlobStore(directory, args.blob_threshold, args.blob_max_bytes)

    def schema(name):
        with open(os.path.join(args.schemas, name), encoding="utf-8") as f:
            return f.read()

    registry = SchemaRegistryClient(registry_settings(args))
    read_task = AvroDeserializer(registry, schema("task_requested.avsc"))
    write_result = AvroSerializer(registry, schema("task_result.avsc"), conf={"auto.register.schemas": True})
    write_dead_letter = AvroSerializer(registry, schema("dead_letter.avsc"), conf={"auto.register.schemas": True})

    topic = f"{args.topic_prefix}tasks.{args.task}"
    results = f"{args.topic_prefix}results"
    ensure_topics(args, [topic, f"{topic}.retry", f"{topic}.dlq"])
    consumer = Consumer(kafka_settings(
        args,
        **{
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            "topic.metadata.refresh.interval.ms": 5000,
        },
    ))
    producer = Producer(kafka_settings(
        args, **{"enable.idempotence": True, "acks": "all", "partitioner": "murmur2_random", "linger.ms": 2}
    ))
    answered = OrderedDict()  # task id -> result, so a redelivered task is answered, not run again
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    consumer.subscribe([topic, f"{topic}.retry"])
    print(f"python worker {args.worker_id} serving {args.task} on {topic}", flush=True)

    def produce_acknowledged(topic_name, key, value):
        delivered = []
        producer.produce(topic_name, key=key, value=value, on_delivery=lambda err, _: delivered.append(err))
        while not delivered:
            producer.poll(0.1)
        if delivered[0] is not None:
            raise KafkaException(delivered[0])

    def dead_letter(message, kind, reason):
        letter = {
            "origin_topic": message.topic(), "origin_partition": message.partition(),
            "origin_offset": message.offset(), "origin_timestamp": message.timestamp()[1],
            "key": message.key(), "value": message.value(),
            "headers": {k: v or b"" for k, v in (message.headers() or [])},
            "error_kind": kind, "error": reason, "attempts": 1,
            "first_failed_at": now_ms(), "dead_lettered_at": now_ms(), "service": f"worker:{args.worker_id}",
        }
        dlq = f"{message.topic()}.dlq"
        produce_acknowledged(dlq, message.key(), write_dead_letter(letter, SerializationContext(dlq, MessageField.VALUE)))
        print(f"dead-lettered {message.topic()}[{message.partition()}]@{message.offset()}: {reason}", flush=True)

    def answer(task):
        started = now_ms()
        result = {
            "task_id": task["task_id"], "workflow_id": task["workflow_id"], "step": task["step"],
            "attempt": task["attempt"], "status": "COMPLETED", "output": None, "error": None,
            "worker_id": args.worker_id, "started_at": started, "finished_at": started,
        }
        try:
            task_input = json.loads(task["input"])
            if blobs is not None:
                task_input = blobs.resolve(task["workflow_id"], task_input)
            output = HANDLERS[args.task](task_input)
            result["output"] = blobs.offload(task["workflow_id"], output) if blobs else json.dumps(output)
        except Permanent as e:
            result.update(status="FAILED", error={"code": e.code, "message": str(e), "retryable": False})
        except BlobUnavailable as e:
            result.update(status="FAILED", error={"code": "blob_unavailable", "message": str(e), "retryable": True})
        except Exception as e:  # a handler's bug fails the attempt, never the worker
            result.update(status="FAILED", error={"code": "handler_error", "message": repr(e), "retryable": True})
        result["finished_at"] = now_ms()
        return result

    while not stopping:
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            print(f"consumer: {message.error()}", flush=True)
            continue
        try:
            task = read_task(message.value(), SerializationContext(message.topic(), MessageField.VALUE))
            if not isinstance(task, dict) or "task_id" not in task:
                raise ValueError("not a TaskRequested")
        except Exception as e:
            dead_letter(message, "invalid", f"not a TaskRequested in the Confluent wire format: {e}")
            consumer.commit(message=message, asynchronous=False)
            continue
        result = answered.get(task["task_id"]) or answer(task)
        answered[task["task_id"]] = result
        while len(answered) > 10_000:
            answered.popitem(last=False)
        value = write_result(result, SerializationContext(results, MessageField.VALUE))
        produce_acknowledged(results, task["workflow_id"].encode("utf-8"), value)
        consumer.commit(message=message, asynchronous=False)
    consumer.close()  # leaves the group at once, so the partitions move without waiting for the session timeout
    producer.flush(10)


if __name__ == "__main__":
    main()
