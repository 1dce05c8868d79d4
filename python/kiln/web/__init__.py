"""kiln over HTTP: the operator API, Prometheus metrics and the dashboard, served in the
daemon's event loop and never on the decision path (docs/http.md)."""
