#!/bin/sh
# The production profile's Kafka (deploy/compose.yaml, image apache/kafka): renders
# server-sasl.properties with the broker's own SCRAM password, formats the data directory on the
# first start with the SCRAM users `broker` and `citypark` (--add-scram: the users exist before
# any client connects, nothing listens unauthenticated in between), then runs the broker.
# Env: CLUSTER_ID, CITYPARK_KAFKA_BROKER_PASSWORD, CITYPARK_KAFKA_PASSWORD (the services' user),
#      KAFKA_ADVERTISED_HOST (kafka); KAFKA_BIN, KAFKA_LOG_DIRS, KAFKA_LISTEN_HOST, KAFKA_PORT,
#      KAFKA_CONTROLLER_PORT, CITYPARK_KAFKA_RUN_DIR let tests/integration/test_broker_auth.py run
#      this very script on loopback. Secrets are written only to files readable by this user.
# Changing a password later: kafka-configs.sh --bootstrap-server kafka:9092
#   --command-config /tmp/citypark/client.properties --alter --entity-type users
#   --entity-name citypark --add-config 'SCRAM-SHA-512=[password=<new>]'
set -eu
: "${CLUSTER_ID:?}" "${CITYPARK_KAFKA_BROKER_PASSWORD:?}" "${CITYPARK_KAFKA_PASSWORD:?}"
HERE=$(dirname "$0")
BIN=${KAFKA_BIN:-/opt/kafka/bin}
DATA=${KAFKA_LOG_DIRS:-/var/lib/kafka/data}
RUN=${CITYPARK_KAFKA_RUN_DIR:-/tmp/citypark}
umask 077
mkdir -p "$RUN"
# hex passwords (openssl rand -hex 32): nothing in them is special to sed or to the JAAS line
sed -e "s#@HOST@#${KAFKA_LISTEN_HOST:-0.0.0.0}#" -e "s#@ADVERTISED_HOST@#${KAFKA_ADVERTISED_HOST:-kafka}#" \
  -e "s#@PORT@#${KAFKA_PORT:-9092}#" -e "s#@CONTROLLER_PORT@#${KAFKA_CONTROLLER_PORT:-9093}#" \
  -e "s#@LOG_DIRS@#$DATA#" \
  -e "s#@BROKER_USER@#broker#" -e "s#@BROKER_PASSWORD@#$CITYPARK_KAFKA_BROKER_PASSWORD#" \
  "$HERE/server-sasl.properties" >"$RUN/server.properties"
# what the health check (and an operator's kafka-*.sh) authenticates with
cat >"$RUN/client.properties" <<PROPS
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$CITYPARK_KAFKA_BROKER_PASSWORD";
PROPS
"$BIN/kafka-storage.sh" format --ignore-formatted -t "$CLUSTER_ID" -c "$RUN/server.properties" \
  --add-scram "SCRAM-SHA-512=[name=broker,password=$CITYPARK_KAFKA_BROKER_PASSWORD]" \
  --add-scram "SCRAM-SHA-512=[name=citypark,password=$CITYPARK_KAFKA_PASSWORD]"
exec "$BIN/kafka-server-start.sh" "$RUN/server.properties"
