"""Resource agents (workstations, warehouses): they bid, queue, execute and document."""
