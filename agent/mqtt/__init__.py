"""The fleet link: one MQTT connection with a durable outbox, presence, commands and telemetry."""
