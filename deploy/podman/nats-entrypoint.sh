#!/bin/sh
# As the official NATS image: arguments that start with "-" are nats-server's.
case "$1" in
  -*) set -- nats-server "$@" ;;
esac
exec "$@"
