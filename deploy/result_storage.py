"""Make an S3 folder the fleet's Prefect result storage: saves the block ``s3-bucket/<name>``.

    python deploy/result_storage.py s3://bucket/prefect-results [--name neuroal-results]

Then every machine of the fleet (the campaign's and each worker's) sets
``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/neuroal-results``, so a campaign reads the cell
results that workers on other machines wrote. The block holds no credentials and no endpoint:
each machine's boto3 finds its own (AWS environment or config files, ``AWS_ENDPOINT_URL`` for an
S3 server other than AWS).
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import urlparse


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="s3://bucket/folder for the results")
    parser.add_argument("--name", default="neuroal-results", help="the block's name (default: neuroal-results)")
    args = parser.parse_args(argv)
    url = urlparse(args.url)
    if url.scheme != "s3" or not url.netloc:
        print(f"result_storage.py: not an s3://bucket/folder URL: {args.url}", file=sys.stderr)
        sys.exit(2)
    from prefect_aws import S3Bucket

    S3Bucket(bucket_name=url.netloc, bucket_folder=url.path.strip("/")).save(args.name, overwrite=True)
    slug = f"s3-bucket/{args.name}"
    print(f"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={slug}")
    return slug


if __name__ == "__main__":
    main()
