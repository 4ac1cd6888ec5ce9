export PYTHONPATH=/work/wt-serve
export GSA_MODEL_DIR=/work/main/models GSA_JOBS_DIR=/tmp/serve-jobs GSA_LOG_LEVEL=WARNING GSA_INTRA_OP_THREADS=1
/work/main/.venv/bin/python -m service.cluster --port 8777 --min-replicas 2 --max-replicas 2 --replica-cpus 0.5 --num-cpus 2 > /tmp/serve_smoke.log 2>&1 &
PID=$!
for i in $(seq 1 120); do
  if curl -s -o /dev/null -w "%{http_code}" 127.0.0.1:8777/v2/health/ready 2>/dev/null | grep -q 200; then echo "ready after $i s"; break; fi; sleep 1
done
for i in 1 2 3 4 5 6; do curl -s -D - -o /dev/null 127.0.0.1:8777/v2/health/ready | grep -i "x-gsa-replica"; done
curl -s -X POST 127.0.0.1:8777/v1/models/rotmnist-r4/predict -H "content-type: image/png" --data-binary @/work/main/docs/orientation_responses.png | head -c 300; echo
kill -INT $PID; sleep 8; kill -9 $PID 2>/dev/null; tail -5 /tmp/serve_smoke.log
