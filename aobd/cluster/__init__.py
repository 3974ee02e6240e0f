"""Several daemons, one cluster: run ownership by Kafka partition assignment."""
