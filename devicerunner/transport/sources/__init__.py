"""Artifact sources: where a device's chunks come from (retained MQTT
messages, MQTT request/response, HTTP(S)). Each implements one narrow
interface (base.ArtifactSource); none of them is trusted: every chunk is
checked against the signed manifest by the sink before it touches disk."""
