"""Transports: MQTT (paho) for fleets; the local inbox lives in devicerunner.update.updater."""
