"""Long scripts as durable jobs: their configuration, records and store, the broker they are queued
on, delivery of their results, and the front end both HTTP doors use."""
