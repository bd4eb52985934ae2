"""python evaluate.py checkpoints=[model.ckpt] data.root=<split>  (see conf/evaluate.yaml)"""

from fashionkp.evaluation.evaluate import main

if __name__ == "__main__":
    main()
