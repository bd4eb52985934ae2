"""python predict.py checkpoints=[model.ckpt] test_csv=test.csv  (see conf/predict.yaml)"""

from fashionkp.inference.predict import main

if __name__ == "__main__":
    main()
