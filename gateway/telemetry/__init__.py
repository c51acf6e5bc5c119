"""OpenTelemetry traces: set-up (:mod:`.setup`), the names of the GenAI
conventions nomoat follows (:mod:`.semconv`), the spans (:mod:`.spans`) and
trace ids in log records (:mod:`.logs`). Off unless an OTLP endpoint is
configured."""
