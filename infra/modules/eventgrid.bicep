// Event Grid system topic on the data storage account: the source of the Event Grid blob trigger
// (the only blob trigger source on Flex Consumption). The subscription to the blob extension
// webhook needs the blobs_extension system key, which exists only after the code is deployed,
// so .github/workflows/deploy.yml creates it after the code deployment.

@description('Azure region of the storage account (a system topic lives where its source lives).')
param location string

@description('System topic name.')
param name string

@description('Resource id of the data storage account.')
param storageAccountId string

@description('Tags for every resource.')
param tags object = {}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: name
  location: location
  tags: tags
  properties: {
    source: storageAccountId
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output id string = systemTopic.id
output name string = systemTopic.name
