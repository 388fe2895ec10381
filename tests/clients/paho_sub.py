#!/usr/bin/env python3
"""A herald device written with stock paho-mqtt (MQTT 5), for the end-to-end tests.

Connects as a device over TCP or WebSocket (optionally TLS), subscribes to `inbox` at
QoS 1 and prints `subscribed`, then one JSON line per message received:
{"envelope": <the payload>, "user": {<MQTT 5 user properties>}, "expiry": <seconds>}.
paho acknowledges each message after it is printed. Runs until killed.
"""
import argparse
import json
import sys

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--transport", choices=["tcp", "websockets"], default="tcp")
parser.add_argument("--device-id", required=True)
parser.add_argument("--token", required=True)
parser.add_argument("--cafile")
parser.add_argument("--network", default="wifi")
args = parser.parse_args()


def on_connect(client, userdata, flags, reason_code, properties):
    if reason_code.is_failure:
        print(f"refused: {reason_code}", file=sys.stderr, flush=True)
        sys.exit(2)
    client.subscribe("inbox", qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    print("subscribed", flush=True)


def on_message(client, userdata, msg):
    props = msg.properties
    user = dict(getattr(props, "UserProperty", []) or [])
    line = {
        "envelope": json.loads(msg.payload),
        "user": user,
        "expiry": getattr(props, "MessageExpiryInterval", None),
    }
    print(json.dumps(line), flush=True)


client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id=args.device_id,
    protocol=mqtt.MQTTv5,
    transport=args.transport,
)
if args.transport == "websockets":
    client.ws_set_options(path="/mqtt")
if args.cafile:
    client.tls_set(ca_certs=args.cafile)
client.username_pw_set(args.device_id, args.token)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
connect_props = Properties(PacketTypes.CONNECT)
connect_props.UserProperty = ("network", args.network)
client.connect(args.host, args.port, keepalive=60, properties=connect_props)
client.loop_forever()
