"""HL7 v2 intake: an MLLP listener that turns orders (ORM^O01, OMI^O23) and ADT
admissions into Kafka events, answering every message with a standard ACK.

- `message`: ER7 basics (decoding, MSH header, escaping) shared by parse and ack;
- `parse`: message → OrderEvent / EncounterEvent, Ignored, or a rejection (pure);
- `ack`: the ACK for any outcome, original or enhanced mode (pure);
- `framing`: the MLLP frame decoder (pure);
- `quarantine`: raw bytes of refused messages, on local disk, never in Kafka;
- `mllp`: the asyncio server (the side effects).
"""
