"""Storage seams: event log, CAS (and, later, bus and cache). Protocols in ``protocols``; backends beside them."""
