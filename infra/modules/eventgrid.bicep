// Event Grid system topic on the data storage account: the source of the Event Grid blob trigger
// (the only blob trigger source on Flex Consumption). The subscription to the blob extension
// webhook needs the blobs_extension system key, which exists only after the code is deployed, so
// it is declared in infra/post-deploy.bicep and deployed after the code (scripts/post-deploy.sh).
//
// Here: the topic's system-assigned identity, which dead-letters undeliverable events into the
// data account's dead-letter container (Storage Blob Data Contributor on that container only),
// and its delivery-failure logs in Log Analytics (AegDeliveryFailureLogs).
// https://learn.microsoft.com/azure/event-grid/managed-service-identity (dead-lettering with an identity)
// https://learn.microsoft.com/azure/azure-monitor/reference/supported-logs/microsoft-eventgrid-systemtopics-logs

@description('Azure region of the storage account (a system topic lives where its source lives).')
param location string

@description('System topic name.')
param name string

@description('Resource id of the data storage account.')
param storageAccountId string

@description('Name of the data storage account.')
param storageAccountName string

@description('Dead-letter container in the data storage account.')
param deadLetterContainerName string

@description('Resource id of the Log Analytics workspace for delivery-failure logs; empty: none.')
param workspaceId string = ''

@description('Tags for every resource.')
param tags object = {}

var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: storageAccountId
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: account
  name: 'default'
}

resource deadLetter 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: deadLetterContainerName
}

resource topicDeadLetterWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadLetter.id, systemTopic.id, storageBlobDataContributor)
  scope: deadLetter
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: systemTopic.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource deliveryFailureLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!empty(workspaceId)) {
  name: 'delivery-failures-to-log-analytics'
  scope: systemTopic
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'DeliveryFailures'
        enabled: true
      }
    ]
  }
}

output id string = systemTopic.id
output name string = systemTopic.name
output principalId string = systemTopic.identity.principalId
