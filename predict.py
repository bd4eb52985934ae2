"""python predict.py checkpoints=[model.ckpt] test_csv=test.csv  (see conf/predict.yaml)"""

from fashionkp.commands import predict_main as main

if __name__ == "__main__":
    main()
