"""Several daemons, one cluster: run ownership by Kafka partition assignment (:mod:`.coordinator`), node attempts
over the ``node.jobs.*`` topics to every daemon's runner (:mod:`.jobs`), and what rides the results topic
(:mod:`.messages`)."""
