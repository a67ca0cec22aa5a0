"""The fault suite (issue: reliability under faults, load and hostile input).

Every loop here is bounded in count and in time, and every server a test starts
listens on 127.0.0.1 and is stopped by its PID."""
