#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora, fuzz/corpus/<target>/seed-*, from the
shapes the tests use (tests/bad_inputs.rs, the unit tests of src/domain, src/config,
src/push). Run it from anywhere: `python3 fuzz/seeds.py`. Needs the `cryptography`
package only for real device keys and signatures (skipped without it)."""

import json
import os
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"


def write(target, name, data):
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (folder / f"seed-{name}").write_bytes(data)


# --- protobuf, by hand: every field the requests use is a string, bytes, an
# int (varint) or a nested message.
def varint(n):
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, value):
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(number << 3 | 2) + varint(len(value)) + value


def message(*fields):
    return b"".join(field(n, v) for n, v in fields if v not in (None, "", b"", 0))


CH = "ch_00112233445566778899aabbccddeeff"
DV = "dv_00112233445566778899aabbccddeeff"
EN = "en_00112233445566778899aabbccddeeff"
CODE = "0123456789abcdef0123456789abcdef"
APNS_TOKEN = "a3f9c2e1d4b5a6978812ab34cd56ef78a3f9c2e1d4b5a6978812ab34cd56ef78"


def proof(signature=b"\x30\x06\x02\x01\x01\x02\x01\x01", timestamp=1_700_000_000_000):
    return message((1, DV), (2, timestamp), (3, signature))


def api_requests(keys):
    context = message((1, "Citrix Workspace"), (2, "192.0.2.7"), (3, "Rotterdam, NL"), (4, "Mozilla/5.0"))
    requests = {
        0: [message((1, "jan"), (2, context), (3, 60), (4, "req-1")), message((1, "u" * 257)),
            message((1, "jan"), (2, message((3, "Rotterdam\u202e")))), message((1, "jan"), (4, "r" * 129))],
        1: [message((1, CH)), message((1, "ch_XYZ"))],
        2: [message((1, CH))],
        3: [message((1, CH)), message((1, DV))],
        4: [message((1, "jan"), (2, "123456")), message((1, "jan"), (2, "12345a"))],
        5: [message((1, "jan"), (2, "jan@gors.nl"), (3, 1)), message((1, "jan"), (3, 2)), message((1, "jan"), (3, 7))],
        6: [message((1, EN))],
        7: [message((1, EN), (2, "287082"))],
        8: [message((1, "jan"))],
        9: [message((1, DV)), message((1, "dv_"))],
        10: [message((1, "jan"))],
        11: [message((1, CODE), (2, 1), (3, APNS_TOKEN), (4, key), (5, algorithm), (6, "Jan's iPhone"))
             for algorithm, key in keys]
            + [message((1, CODE), (2, 2), (3, "fcm:token-1_x"), (4, b"\x04" * 65), (5, 1)),
               message((1, "not a code!"), (2, 3))],
        12: [message((1, proof()), (2, "fcm:token-2")), message((1, proof()), (2, "two words"))],
        13: [message((1, proof())), message((1, proof(b"\x00" * 600)))],
        14: [message((1, proof()), (2, CH), (3, 1), (4, "42")), message((1, proof()), (2, CH), (3, 2)),
             message((1, proof()), (2, CH), (3, 3)), message((1, proof()), (2, CH), (3, 1), (4, "4x"))],
    }
    for selector, messages in requests.items():
        for i, body in enumerate(messages):
            write("api_requests", f"{selector:02}-{i}", bytes([selector]) + body)
    cert = client_certificate()
    if cert:
        write("api_requests", "15-client-certificate", bytes([15]) + cert)


def client_certificate():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import datetime
    except ImportError:
        return None
    key = ec.derive_private_key(7, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2026, 1, 1)).not_valid_after(datetime.datetime(2036, 1, 1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:pushmatch:tenant:gors")]), False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def device_keys():
    """(proto algorithm, public key bytes, signature over MESSAGE in each form)."""
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
    except ImportError:
        return []
    out = []
    p256 = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
    public = p256.public_key()
    der_sig = p256.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
    r, s = utils.decode_dss_signature(der_sig)
    raw_sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    high = r.to_bytes(32, "big") + (n - s).to_bytes(32, "big")
    for encoding, fmt in [(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
                          (serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint),
                          (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)]:
        out.append((1, public.public_bytes(encoding, fmt), [der_sig, raw_sig, high]))
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    out.append((2, ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
                [ed.sign(MESSAGE)]))
    return out


# What a device signs: RespondToChallenge with its fields (src/domain/device.rs).
MESSAGE = f"pushmatch/v1\nRespondToChallenge\n{DV}\n1700000000000\n{CH}\nDECISION_APPROVE\n42".encode()


def device_proof(keys):
    now = struct.pack("<q", 1_700_000_000_000)
    fields = MESSAGE.split(b"\n", 4)[4]  # what the target signs after the fixed prefix
    i = 0
    for algorithm, key, signatures in keys:
        for signature in signatures:
            mode = 0 if algorithm == 1 else 1
            write("device_proof", f"{i:02}", bytes([mode, len(key)]) + key + bytes([len(signature)]) + signature
                  + now + now + fields)
            i += 1
    # Malformed keys of the unit tests: 65 bytes of 4s, three bytes, 31 zero bytes,
    # a "compact" SEC1 tag, the Ed25519 identity (a weak key).
    for mode, key in [(0, b"\x04" * 65), (0, b"\x01\x02\x03"), (1, b"\x00" * 31), (0, b"\x05" + b"\x11" * 32),
                      (1, b"\x01" + b"\x00" * 31)]:
        write("device_proof", f"{i:02}", bytes([mode, len(key)]) + key + bytes([64]) + b"\x00" * 64 + now + now)
        i += 1
    # Key pairs made from the input: 32 secret bytes, a flip position, the message.
    write("device_proof", "pair-p256", bytes([2]) + bytes(range(1, 33)) + b"\x07" + MESSAGE)
    write("device_proof", "pair-ed25519", bytes([3]) + bytes(range(1, 33)) + b"\x07" + MESSAGE)


def enrollment_uris():
    sep = b"\xff"
    for i, (server, issuer, account, code, secret) in enumerate([
        (b"https://mfa.gors.nl", b"Gors", b"jan@gors.nl", CODE.encode(), b"12345678901234567890"),
        (b"http://127.0.0.1:50051", b"A&B Bank", b"jan+test@example.com", b"", b"\x00" * 20),
        (b"https://x/?a=b&c=d", "Gör's".encode(), "日本語 ü".encode(), b"ABCdef123", b""),
    ]):
        write("enrollment_uris", f"{i}", b"\x00" + sep + server + sep + issuer + sep + account + sep + code + sep + secret)
    write("enrollment_uris", "phone-uri",
          f"pushmatch://enroll?v=1&server=https%3A%2F%2Fmfa.gors.nl&code={CODE}&issuer=Gors&account=jan%40gors.nl")


TENANT = """
[[tenants]]
id = "gors"
display_name = "Gors"
api_key_sha256 = ["6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"]
"""


def config():
    example = (HERE.parent / "pushmatch.example.toml").read_text()
    cases = [
        (1, example + TENANT, ""),
        (0, "", ""),
        (0, "", "PUSHMATCH_SERVER__LISTEN=0.0.0.0:50051\n"),
        (1, '[server]\nlisten = "127.0.0.1:7000"\n[challenge]\ndefault_ttl_seconds = 30\n' + TENANT,
         "PUSHMATCH_SERVER__LISTEN=0.0.0.0:50051\nPUSHMATCH_CHALLENGE__MAX_TTL_SECONDS=120\nPUSHMATCH_CONFIG=/ignored\nOTHER=x\n"),
        (1, TENANT, "PUSHMATCH_SERVER__METRICS_LISTEN=\n"),
        (1, '[challenge]\ndefault_ttl_seconds = 400\n' + TENANT, ""),
        (1, TENANT, "PUSHMATCH_LIMITS__MAX_PENDING_PER_USER=0\n"),
        (1, TENANT, "PUSHMATCH_SERVER__CREATES_SHARE_PER_TENANT=nan\n"),
        (1, TENANT, "PUSHMATCH_PUSH__QUEUE_SHARE_PER_TENANT=0.00001\nPUSHMATCH_SERVER__MAX_CREATES_IN_FLIGHT=3\n"),
        (1, TENANT, "PUSHMATCH_STORE__BACKEND=redis\nPUSHMATCH_STORE__REDIS_URL=redis://cache:6379\n"
                    "PUSHMATCH_SECRETS__KEY_HEX=" + "ab" * 32 + "\n"),
        (1, TENANT + TENANT.replace("gors", "acme").replace("Gors", "Acme").replace("6b86", "7b86"), ""),
        (1, TENANT, "PUSHMATCH_STORE__REDIS_CLUSTER_URLS=[\"redis://a:1\", \"redis://b:2\"]\nPUSHMATCH_TENANTS={}\n"),
    ]
    for i, (flags, text, env) in enumerate(cases):
        write("config", f"{i:02}", bytes([flags]) + text.encode() + (b"\0" + env.encode() if env else b""))


def push_responses():
    def response(selector, status, body, retry=b""):
        return bytes([selector]) + struct.pack("<H", status - 100) + bytes([len(retry)]) + retry + body.encode()

    fcm_error = lambda code, status, error_code: json.dumps({"error": {
        "code": code, "message": "Requested entity was not found.", "status": status,
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]}})
    bad_token = json.dumps({"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                      "message": "The registration token is not a valid FCM registration token",
                                      "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                                   "fieldViolations": [{"field": "message.token", "description": "x"}]}]}})
    seeds = [
        response(0, 200, ""), response(0, 410, '{"reason":"Unregistered","timestamp":1700000000000}'),
        response(0, 400, '{"reason":"BadDeviceToken"}'), response(0, 429, '{"reason":"TooManyRequests"}', b"30"),
        response(0, 503, '{"reason":"ServiceUnavailable"}'), response(0, 403, '{"reason":"ExpiredProviderToken"}'),
        response(1, 200, '{"name":"projects/p/messages/1"}'), response(1, 404, fcm_error(404, "NOT_FOUND", "UNREGISTERED")),
        response(1, 400, bad_token), response(1, 429, fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), b"17"),
        response(1, 500, "<html>oops</html>"),
        response(2, 200, '{"access_token":"ya29.token","expires_in":3599,"token_type":"Bearer"}'),
        response(2, 400, '{"error":"invalid_grant","error_description":"Invalid JWT"}'),
        response(2, 200, '{"access_token":"bad\\nvalue"}'),
        response(3, 200, json.dumps({"type": "service_account", "project_id": "pushmatch-test",
                                     "private_key_id": "k1", "private_key": "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
                                     "client_email": "a@b.iam.gserviceaccount.com", "token_uri": "https://oauth2.googleapis.com/token"})),
        response(4, 200, "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n"),
    ]
    for i, seed in enumerate(seeds):
        write("push_responses", f"{i:02}", seed)


if __name__ == "__main__":
    keys = device_keys()
    api_requests([(algorithm, key) for algorithm, key, _ in keys])
    device_proof(keys)
    enrollment_uris()
    config()
    push_responses()
    print(f"seeds written under {CORPUS}")
