//! `did data prepare`: a corpus in, token shards out.

pub mod documents;
pub mod prepare;
pub mod shard;
pub mod tokenizer;
