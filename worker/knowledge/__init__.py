"""ID knowledge kept in the input's own store (DESIGN 11): the contract, the stores, and the
feed that carries facts between a store and the scheduler's in-memory knowledge."""
