"""A core workload for finding the smallest MicroPython heap it runs in.

Imports every core module and does what a board does at each renewal:
read a certificate's dates, ask the clock guard and the renewal policy,
build and decode enrollment messages and turn over a flash store
generation. Prints ``HEAP OK`` at the end.

usage: micropython -X heapsize=N heap_probe.py ROOT CERT_DER SCRATCH
"""

import sys

sys.path.insert(0, sys.argv[1])

from device_agent.core import clock, der, flashstore, messages, policy

with open(sys.argv[2], "rb") as handle:
    certificate = handle.read()
not_before, not_after = der.certificate_dates(certificate)
state, _ = clock.assess(not_before + 10, None, [not_before])
due = policy.renewal_time(not_before, not_after, unit=0.5)
wait = policy.retry_delay(2, due, not_after, not_after - not_before)
pem = der.to_pem(certificate)
request = messages.encode_request("0123abcd", pem)
assert messages.decode_request(request)[1] == pem
store = flashstore.FlashStore(sys.argv[3])
for _ in range(3):
    store.commit(store.stage({"c0.der": certificate, "slot": b"1"}))
    store.prune()
assert store.load()["c0.der"] == certificate
print("HEAP OK", state, wait > 0)
